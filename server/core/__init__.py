"""The rules with no I/O: a task and its operations (`model`), the errors and their HTTP
answers (`errors`), the HTTP contract (`contract`), validation of untrusted input
(`validate`), JSON (`jsonutil`) and token verification (`auth`). Imports nothing else of
the server."""
