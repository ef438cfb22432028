"""``fastif bench``: FastIF's measurements reproduced against this engine and service.

Suites: ``speed``, ``recall``, ``stest``, ``batch``, ``service`` (one module each);
``runner.run_suite`` is the entry point. Each suite writes ``SUITE.md`` and
``SUITE.json`` (with a top-level ``headline`` object) into the results folder.
"""
