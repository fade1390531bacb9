"""Helpers shared by the tests: import them from here (`from tests.support.runtime import run_model`).

No test module imports another test module. Fixtures live in conftest.py files (tests/conftest.py for the
whole suite, tests/cli/conftest.py for the command line); plain functions, classes and constants live here.
"""
