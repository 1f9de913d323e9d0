"""compact excludes other writers for its whole run, so a finished refit is never thrown away."""

import pytest

from tvbase.errors import StoreLockedError
from tvbase.methods.tucker import ClusterTucker
from tvbase.store import Store


def test_a_writer_during_compacts_fit_is_refused_and_compact_commits(populated_copy, monkeypatch):
    real_fit, refused = ClusterTucker.fit, []

    def fit_while_another_writer_tries(self, *args, **kwargs):
        other = Store.open(populated_copy)
        with pytest.raises(StoreLockedError, match="locked"):
            other.rm(["a0"])
        refused.append(True)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(ClusterTucker, "fit", fit_while_another_writer_tries)
    before = Store.open(populated_copy).tasks
    Store.open(populated_copy).compact(device="cpu", progress=False)
    after = Store.open(populated_copy)
    assert refused == [True]
    assert after.log()[0]["metadata"]["op"] == "compact" and after.log()[0]["metadata"]["tasks"] == before
    assert after.tasks == before and {r["kind"] for r in after.ls()} == {"shared"}
