"""Rule names are constants: every table rule and every outcome names itself with one."""

from traqmilter.core.engine import RCPT_RULES, ROUTING_RULES
from traqmilter.core.plan import MESSAGE_RULES
from traqmilter.core.rule_names import UNKNOWN_ACTION, RuleName
from traqmilter.core.settings import Action


def test_every_table_rule_is_named_by_a_constant_once() -> None:
    for table in (RCPT_RULES, ROUTING_RULES, MESSAGE_RULES):
        names = [rule.name for rule in table]
        assert all(type(name) is RuleName for name in names)
        assert len(set(names)) == len(names)


def test_every_action_has_its_unknown_rule() -> None:
    assert set(UNKNOWN_ACTION) == set(Action)
    assert {name.value for name in UNKNOWN_ACTION.values()} == {f"unknown_{a}" for a in Action}


def test_names_read_as_their_words() -> None:
    # Logs, JSON and metric labels take a rule as text.
    assert f"rule={RuleName.KNOWN}" == "rule=known"
    assert str(RuleName.LOOKUP_FAILED) == "lookup_failed"
