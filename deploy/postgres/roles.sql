-- Roles and database for monthly-token-reset, run once by a superuser:
--
--   psql -v ON_ERROR_STOP=1 -v login_role=token_reset -v login_password=... \
--        -v database=token_reset -f deploy/postgres/roles.sql
--
-- (compose runs it through init-roles.sh on an empty data directory.)  Afterwards
-- nothing of the stack needs a superuser: the listener and `token-reset migrate` log
-- in as :login_role, which owns :database (so it may create the schema's objects and
-- run the bulk reset, which writes token_reset_bulk_runs) and is a member of
-- token_reset_app, the group role of the SQL contract.  It may not create roles or
-- databases.  Give applications that call deduct_tokens() a login role of their own
-- IN ROLE token_reset_app.

-- Migration 0001 creates token_reset_app only when the migrating role may create
-- roles; this login role may not, so the superuser creates it here.
SELECT 'CREATE ROLE token_reset_app NOLOGIN'
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'token_reset_app')
\gexec

CREATE ROLE :"login_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'login_password' IN ROLE token_reset_app;

CREATE DATABASE :"database" OWNER :"login_role";
