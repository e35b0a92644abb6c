"""The server's logic, grouped by resource. Each service takes the `ServerContext` and
plain typed arguments, returns typed results (`model/admin.py`, `model/wire.py`) and
refuses with a `StrataError` subclass (`NotFound`, `Conflict`, `Invalid`, …), which the
app answers with its HTTP status: routes only parse, check who calls, and call one
service. The same services will serve the web console."""
