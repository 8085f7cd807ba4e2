import pytest

from scap_onnx.errors import ScapError
from scap_onnx.calibration.spec import parse_spec


def test_single_number_applies_to_every_role():
    s = parse_spec("0.5")
    assert s.sparsity("q") == 0.5 and s.sparsity("down") == 0.5 and s.sparsity("other") == 0.5
    assert str(s) == "0.5"


def test_per_role_leaves_other_roles_dense():
    s = parse_spec("up=0.35, gate=0.35,down=0.55")
    assert (s.sparsity("up"), s.sparsity("gate"), s.sparsity("down")) == (0.35, 0.35, 0.55)
    assert s.sparsity("q") is None and s.sparsity("o") is None
    assert parse_spec(str(s)) == s


def test_fused_roles_take_the_value_of_their_parts():
    s = parse_spec("up=0.35,gate=0.35,down=0.55,q=0.3,k=0.4,v=0.5")
    assert s.sparsity("gate_up") == 0.35  # Phi-3's fused gate_up_proj
    assert s.sparsity("qkv") == pytest.approx(0.4)  # their mean when they differ
    assert parse_spec("gate_up=0.2,up=0.35").sparsity("gate_up") == 0.2  # named: its own value
    assert parse_spec("down=0.5").sparsity("gate_up") is None
    assert parse_spec("*=0.3,up=0.6").sparsity("gate_up") == pytest.approx(0.45)  # gate takes the default
    assert parse_spec("q=0.35,k=0.35,v=0.35").sparsity("qkv") == 0.35  # exact when equal


def test_default_with_star():
    s = parse_spec("down=0.6,*=0.3")
    assert s.sparsity("down") == 0.6 and s.sparsity("q") == 0.3


def test_number_and_spec_object_pass_through():
    assert parse_spec(0.25).sparsity("v") == 0.25
    s = parse_spec("0.1")
    assert parse_spec(s) is s


@pytest.mark.parametrize("bad", ["1", "1.0", "-0.1", "nan", "1.5", "up=1", "up=-0.2", "", "up", "foo=0.3",
                                  "up=0.3,up=0.4", "up=abc", "abc"])
def test_bad_specs_raise_scap_error(bad):
    with pytest.raises(ScapError):
        parse_spec(bad)


def test_zero_is_allowed():
    assert parse_spec("0").sparsity("q") == 0.0
