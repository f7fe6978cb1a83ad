"""The one test-support layer, shared by unit, integration, fault, e2e, pgbouncer and bench code.

* `database`: the test server (TEST_DATABASE_URL or embedded) and per-test databases.
* `users`: users in known states (stale ones above all) and what the ledger says of them.
* `waiting`: waiting on a condition with a deadline, the only synchronisation tests use.
* `recording_server`: a loopback HTTP server that records what it receives.
* `leaks`: checks that no secret reached an output.
* `notices`: rollover-notice destinations with secrets, and a real rollover.
* `metrics`: one reader of metrics, a /metrics answer (`Scrape`) or an in-process registry.
* `env`: the environment a child process gets (nothing configures it by accident).
* `cli`: the one CLI runner, `python -m listener <args>`, blocking or awaited.
* `bulk`: bulk-run helpers: held row locks, sessions waiting on a lock, the runs table.
* `service`: the service in the test's own task group, its readiness, counters = ledger.
* `processes`: the one process harness: any program as a child (`Process`), and the real
  `listen` with its log events, /readyz and /metrics (`running_listener`).
* `bench`: the benchmarks' smoke runs, `python -m bench...` as a child, and their JSON.
"""
