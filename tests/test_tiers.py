"""The test tiers' own machinery: under ``-n 2`` (``--dist loadgroup``), the tests of an ``xdist_group`` share one
worker, so a module-scoped run they share trains once. pytest 9.2 with pytest-xdist 3.8 silently dropped the groups
(xdist renames a field pytest stopped reading): each worker trained its own copy of every shared run."""

import os

import pytest


@pytest.mark.fast
@pytest.mark.xdist_group("tiers_check")
def test_a_grouped_test_is_scheduled_by_its_group(request):
    if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getvalue("loadgroup"):
        pytest.skip("runs under pytest -n with --dist loadgroup (the default options)")
    # xdist's scheduler reads the group from the id: without the suffix every test is its own unit
    assert request.node.nodeid.endswith("@tiers_check"), (
        f"xdist_group is ignored ({request.node.nodeid!r}: no @tiers_check): the pytest and pytest-xdist installed "
        "do not work together; install from requirements/cpu.lock")
