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


class TestS3(StoreConformance):
    """On a moto S3 server (the ``s3`` fixture): Icechunk's S3 storage, writers told apart by
    commit conflicts."""

    @pytest.fixture
    def location(self, s3):
        return s3.url(f"stores/{uuid.uuid4().hex}")
