#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory, as the
# image's superuser: the login role of the listener and of migrate (a member of
# token_reset_app, not a superuser) and the database it owns.  See roles.sql.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v login_role=token_reset \
    -v login_password="$TOKEN_RESET_DB_PASSWORD" \
    -v database=token_reset \
    -f /etc/token-reset/roles.sql
