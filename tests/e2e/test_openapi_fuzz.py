"""The API against its own /openapi.json, fuzzed (a bounded number of examples per route, so the
suite stays quick): no input makes the server fail (5xx), and every status it sends is one the
document lists, with the content type it names. Hypothesis starts from boundary values, which
is where the bugs in the faults-and-trust issue were (10 MB bodies, lone surrogates, odd types)."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.e2e.conftest import PotluckUp

EXAMPLES = 25  # per route; CI time, not a bound on what the fuzzer could find with more


def test_no_input_fails_the_server_or_gets_an_undocumented_status(potluck: PotluckUp) -> None:
    schema = schemathesis.openapi.from_url(f"{potluck.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/health"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)  # fmt: skip
        def fuzz(case: Any) -> None:
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 64)  # a valid request runs: keep it short
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance],
                                   timeout=120)  # fmt: skip

        fuzz()
