"""Server and process management: the stack of `sngp serve`, the temporary local Prefect server of
`sngp run`/`retrain`/`sweep`, and child processes. Used by the CLI and the tests, never by flows or tasks."""
