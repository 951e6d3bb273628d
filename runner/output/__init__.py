"""Structured outputs: the job's JSON Schema (schema.py), answer validation (validate.py) and
the typed columns of parsed answers.

The one home of the JSON Schema validator (fastjsonschema). Imports only errors, records and
spec from the package: nothing of HTTP, storage or runs.
"""
