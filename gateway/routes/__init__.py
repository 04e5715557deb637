"""HTTP routes. Each module is thin: parse, look up owned objects, call admission or a
query, shape the response with the SDK's own types."""
