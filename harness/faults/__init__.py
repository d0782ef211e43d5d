"""
The fault suite: scenarios that break things on purpose and count what callers
saw.  ``python -m harness.faults`` runs them (:mod:`harness.faults.report`
describes them); the integration tests run them at small sizes.
"""
