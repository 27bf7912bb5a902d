"""Knowledge distillation while gates train, and the hard-concrete penalty's warm-up."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from benchmarks.study import parse_variant, plan, study_config_from_dict, variant_distills, variant_prunes_ffn
from conftest import make_tiny_bert
from pipeline.config import ConfigError, load_config
from pipeline.gates import remove_head_gates_
from pipeline.methods import HardConcreteConfig, add_hardconcrete_gates_
from pipeline.training import add_distillation_, distillation_loss


def test_distillation_loss_is_the_softened_kl_times_t_squared():
    student = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[1.0, 0.0, 0.0], [-2.0, 1.0, 1.0]])
    t = 3.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert torch.allclose(distillation_loss(student, teacher, t), expected)
    assert distillation_loss(teacher, teacher, t).abs() < 1e-6
    # One output: regression, mean squared error.
    assert torch.allclose(distillation_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]]), t),
                          torch.tensor(2.5))


def test_distillation_mixes_the_teacher_into_the_training_loss_only(tiny_inputs):
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    labels = torch.tensor([0, 1, 1])
    with torch.no_grad():
        target = teacher(**tiny_inputs).logits
    student.train()
    plain = student(**tiny_inputs, labels=labels)
    hook = add_distillation_(student, teacher, weight=0.25, temperature=2.0)
    mixed = student(**tiny_inputs, labels=labels)
    expected = 0.75 * plain.loss + 0.25 * distillation_loss(plain.logits, target, 2.0)
    assert torch.allclose(mixed.loss, expected) and not torch.allclose(mixed.loss, plain.loss)
    mixed.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())  # the teacher only answers
    assert all(not p.requires_grad for p in teacher.parameters())
    student.eval()
    with torch.no_grad():  # evaluation scores the task alone
        assert torch.allclose(student(**tiny_inputs, labels=labels).loss, F.cross_entropy(plain.logits, labels))
    hook.remove()
    student.train()
    assert torch.allclose(student(**tiny_inputs, labels=labels).loss, plain.loss)
    with pytest.raises(ValueError, match="weight"):
        add_distillation_(student, teacher, weight=1.5, temperature=2.0)


def test_distillation_pulls_the_student_to_the_teacher(tiny_inputs):
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    with torch.no_grad():
        target = teacher(**tiny_inputs).logits
        before = distillation_loss(student(**tiny_inputs).logits, target, 1.0).item()
    add_distillation_(student, teacher, weight=1.0, temperature=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    for _ in range(30):
        loss = student(**tiny_inputs, labels=torch.tensor([0, 0, 0])).loss  # weight 1: the labels do not count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    student.eval()
    with torch.no_grad():
        after = distillation_loss(student(**tiny_inputs).logits, target, 1.0).item()
    assert after < 0.2 * before


def test_distillation_runs_before_the_hardconcrete_penalty(tiny_inputs):
    """The penalty is added after the mix, so distillation does not scale it down."""
    student, teacher = make_tiny_bert(seed=0), make_tiny_bert(seed=1)
    labels = torch.tensor([0, 1, 1])
    add_distillation_(student, teacher, weight=0.5, temperature=2.0)
    gates = add_hardconcrete_gates_(student, HardConcreteConfig(keep=3, penalty=2.0))
    student.train()
    torch.manual_seed(0)
    out = student(**tiny_inputs, labels=labels)
    penalty = gates.penalty()
    task = F.cross_entropy(out.logits, labels)
    with torch.no_grad():
        target = teacher(**tiny_inputs).logits
    assert torch.allclose(out.loss, 0.5 * task + 0.5 * distillation_loss(out.logits, target, 2.0) + penalty)
    remove_head_gates_(student)


def test_hardconcrete_penalty_warms_up_linearly():
    gates = add_hardconcrete_gates_(make_tiny_bert(), HardConcreteConfig(keep=3, penalty=2.0, penalty_warmup_steps=10))
    full = 2.0 * gates.open_probability().sum()
    for step, share in ((0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0)):
        gates.step = step
        assert math.isclose(gates.penalty().item(), share * full.item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="penalty_warmup_steps"):
        HardConcreteConfig(keep=3, penalty_warmup_steps=-1)


def test_distill_config_is_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune: {method: michel, distill: {weight: 0.5}}\n")
    with pytest.raises(ConfigError, match=r"prune\.distill\.weight: 0\.5 .*'michel'"):
        load_config(path)
    path.write_text("prune: {distill: {weight: 1.5, temperature: 0}}\n")
    with pytest.raises(ConfigError, match=r"prune\.distill\.weight.*1\.5.*prune\.distill\.temperature"):
        load_config(path)
    assert load_config(path, ["prune.distill.weight=0.5", "prune.distill.temperature=3"]).prune.distill.weight == 0.5


def test_study_kd_variants_parse_and_need_the_reference(tmp_path):
    assert parse_variant("dsp+ffn+kd:joint") == ("dsp", "joint")
    assert variant_distills("dsp+ffn+kd:joint") and variant_prunes_ffn("dsp+ffn+kd:joint")
    assert variant_distills("ste+kd:joint") and not variant_prunes_ffn("ste+kd:joint")
    assert not variant_distills("dsp:joint")
    with pytest.raises(ValueError, match=r"\+kd distils"):
        parse_variant("michel+kd")
    config = study_config_from_dict({"seeds": [0, 1], "keeps": [12], "variants": ["dsp+kd:joint", "ste:joint"]})
    _, references, rows = plan(config, tmp_path, None, (0, 1))
    assert [j.seed for j in references] == [0, 1] and len(rows) == 4
    plain = study_config_from_dict({"seeds": [0], "keeps": [12], "variants": ["dsp:joint"]})
    assert plan(plain, tmp_path, None, (0, 1))[1] == []


@pytest.mark.integration
def test_finetune_stage_distils_from_the_reference(tmp_path):
    from conftest import finetune_and_harden

    run = finetune_and_harden(tmp_path, "prune.method=dsp", "prune.keep=18", "prune.distill.weight=0.5")
    mask = json.loads((run / "harden" / "mask.json").read_text())
    assert sum(len(v) for v in mask["kept_heads"].values()) == 18
    assert json.loads((run / "finetune" / "metrics.json").read_text())["gated_train"]["steps"] > 0


def test_gate_learning_rate_defaults_per_method(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("prune: {method: hardconcrete}\n")
    assert load_config(path).prune.effective_gate_lr == 0.001
    assert load_config(path, ["prune.method=dsp"]).prune.effective_gate_lr == 0.5
    assert load_config(path, ["prune.gate_lr=0.1"]).prune.effective_gate_lr == 0.1
    with pytest.raises(ConfigError, match=r"prune\.gate_lr: must be positive"):
        load_config(path, ["prune.gate_lr=0"])
