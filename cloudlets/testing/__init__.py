"""Conformance suites for driver authors.

Every driver cloudlets ships passes these, and so can yours: subclass the
suite in your own tests and supply the fixtures it asks for (see
:doc:`/drivers/writing`)::

    from cloudlets.testing.storage import StorageDriverConformance

    class TestAcmeStorage(StorageDriverConformance):
        @pytest.fixture
        def storage(self):
            return AcmeStorage(...)

        @pytest.fixture
        def new_location(self):
            return lambda name: f"acme://bucket/{name}"

The suites need pytest (``pip install cloudlets[test]``).
"""
