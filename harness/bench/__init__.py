"""
The load drivers: ``python -m harness.bench SCENARIO`` measures taskoffload on
this machine (:mod:`harness.bench.cli` describes the scenarios).
"""
