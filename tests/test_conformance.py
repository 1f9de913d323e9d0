"""The storage conformance suite (tvbase.testing.conformance) on every location kind tvbase has."""

import uuid

import pytest

from tvbase.testing.conformance import StoreConformance


class TestLocalDirectory(StoreConformance):
    @pytest.fixture
    def location(self, tmp_path):
        return tmp_path / "store"


class TestInMemory(StoreConformance):
    @pytest.fixture
    def location(self):
        return f"memory://{uuid.uuid4().hex}"
