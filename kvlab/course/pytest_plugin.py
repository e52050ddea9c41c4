"""pytest plugin for `make test` (loaded with `-p kvlab.course.pytest_plugin`).

With pytest-xdist's `--dist loadgroup`, tests carrying the same `xdist_group` run on one worker, in
order. This plugin gives every test without a group the group of its file: an nbval notebook (whose
cells must run in order in one kernel) or a test module (whose module fixtures are then built once)
stays on one worker, while `tests/test_course_notebooks.py` sets one group per chapter so that the
chapters spread over the workers.
"""
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(str(item.path)))
