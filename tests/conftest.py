"""Suite-wide pytest setup.

Shared helpers are plain functions in `tests.support` (imported by the tests); fixtures shared by a folder's
tests live in that folder's conftest.py (tests/cli/conftest.py: the command-line workspace).
"""

import pytest

# The support modules hold assertions (tests/support/qdq_checks.py, tests/support/cli.py): let pytest rewrite
# them as it does a test module's, so a failure shows the values compared.
pytest.register_assert_rewrite("tests.support")
