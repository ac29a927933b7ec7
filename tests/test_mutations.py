"""The mutation check (tests/mutation/run_mutations.py): every deliberate break of the training loop is caught by the
tests.  About 10 minutes on 2 CPU cores, hence slow."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_every_mutation_is_killed():
    from tests.mutation.run_mutations import MUTATIONS, main

    results = main([])
    assert set(results) == {m.name for m in MUTATIONS}
    survivors = {name: status for name, status in results.items() if status != "killed"}
    assert not survivors, survivors
