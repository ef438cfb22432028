"""The ``fastif`` command line: engine, service and benchmarks under one name.

It lives outside ``fastif/`` so that the engine package never imports the
service stack; each subcommand imports only what it runs.
"""
