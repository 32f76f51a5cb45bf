"""The one registry type and the one choice check behind every named setting."""
import pytest

from workbench.baselines.registry import BASELINES
from workbench.core.arch import ARCH_SPECS
from workbench.core.cache import CACHE_KINDS
from workbench.core.registry import Registry, UnknownChoiceError, check_choice
from workbench.data.text import HUB_SOURCES
from workbench.plans.allocation import ALLOCATIONS
from workbench.plans.normalize import NORMALIZERS, PRESETS
from workbench.runs.sweep import OBJECTIVES
from workbench.scoring.layer_importance import LAYER_IMPORTANCE
from workbench.scoring.methods import IMPORTANCE_METHODS

REGISTRIES = dict(BASELINES=BASELINES, CACHE_KINDS=CACHE_KINDS, ARCH_SPECS=ARCH_SPECS, HUB_SOURCES=HUB_SOURCES,
                  ALLOCATIONS=ALLOCATIONS, NORMALIZERS=NORMALIZERS, PRESETS=PRESETS, OBJECTIVES=OBJECTIVES,
                  LAYER_IMPORTANCE=LAYER_IMPORTANCE, IMPORTANCE_METHODS=IMPORTANCE_METHODS)


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_every_registry_answers_an_unknown_name_with_the_allowed_ones_and_the_closest(name):
    reg = REGISTRIES[name]
    assert isinstance(reg, Registry) and len(reg) > 0
    first = next(iter(reg))
    typo = first[:-1] + ("x" if first[-1] != "x" else "y")
    with pytest.raises(KeyError) as e:
        reg[typo]
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert f"{typo!r} is not registered; allowed: {list(reg)}" in msg
    assert f"did you mean {first!r}?" in msg or len(first) < 4


def test_two_entries_cannot_share_a_name():
    with pytest.raises(ValueError, match="two method entries are named 'a'"):
        Registry("method", [("a", 1), ("a", 2)])


def test_registries_are_read_only_mappings():
    reg = Registry("method", {"a": 1})
    with pytest.raises(TypeError):
        reg["b"] = 2  # type: ignore[index]
    assert dict(reg) == {"a": 1} and "a" in reg and list(reg.items()) == [("a", 1)]


def test_check_choice_names_value_allowed_and_closest_and_takes_the_caller_s_error():
    assert check_choice("mode", "one_shot", ("one_shot", "sequential")) == "one_shot"
    with pytest.raises(UnknownChoiceError, match=r"mode='sequentail' is not allowed; allowed: \['one_shot', "
                                                 r"'sequential'\]; did you mean 'sequential'\?"):
        check_choice("mode", "sequentail", ("one_shot", "sequential"))

    class MyError(ValueError):
        pass

    with pytest.raises(MyError, match="x=3 is not allowed; allowed: \\[1, 2\\]$"):
        check_choice("x", 3, (1, 2), MyError)
    with pytest.raises(UnknownChoiceError, match="measure='act' is not registered.*or None"):
        LAYER_IMPORTANCE.check("act", also="None")
