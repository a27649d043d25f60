"""docs/spec.md, the formulas and test vectors the code cites: it is in the repository, every
"docs/spec.md section N" citation names a section it has, and some of the vectors printed
in it are read back from the markdown and recomputed with kd's own functions, so the page
and the code cannot drift apart unnoticed."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from kd import divergences as D

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "spec.md"
SCANNED = ["kd", "recipes", "tests", "benchmarks", "conf", "notebooks", "README.md", "docs"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".ipynb", ".txt", ".toml", ".cfg", ".sh"}
NUMBER = r"-?\d+(?:\.\d+)?(?:e-?\d+)?"


def _scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in SUFFIXES
                      and "__pycache__" not in p.parts]
    return [p for p in files if p.resolve() != Path(__file__).resolve()]


def _sections() -> dict[int, str]:
    """Numbered ``## N. Title`` sections of docs/spec.md: number -> text up to the next ``## ``."""
    parts = re.split(r"^## ", SPEC.read_text(encoding="utf-8"), flags=re.M)
    out = {}
    for part in parts[1:]:
        m = re.match(r"(\d+)\. \S", part)
        if m:
            out[int(m.group(1))] = part
    return out


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(NUMBER, text)]


def _table(section: int) -> dict[str, list[float]]:
    """The ``| quantity | value |`` rows of a section: quantity cell -> the numbers of the value cell."""
    rows = {}
    for line in _sections()[section].splitlines():
        m = re.match(r"^\|\s*(.+?)\s*\|\s*(.+?)\s*\|$", line)
        if m and m.group(1) != "quantity" and not set(m.group(1)) <= set("-: "):
            rows[m.group(1)] = _numbers(m.group(2))
    return rows


def _given(section: int, name: str) -> list[float]:
    """The numbers of an input written ``name = value`` in backticks in the section's text."""
    m = re.search(r"`" + re.escape(name) + r" = ([^`]+)`", _sections()[section])
    assert m, f"docs/spec.md section {section} no longer states `{name} = ...`"
    return _numbers(m.group(1))


def _log(p: list[float]) -> torch.Tensor:
    return torch.tensor(p, dtype=torch.float64).log()


# --------------------------------------------------------------------------- the file and its citations


def test_spec_has_the_nine_numbered_sections_in_order():
    text = SPEC.read_text(encoding="utf-8")
    numbers = [int(n) for n in re.findall(r"^## (\d+)\. \S", text, flags=re.M)]
    assert numbers == list(range(1, 10))
    assert "## 5. GKD: generalized JSD" in text


def test_no_file_cites_the_out_of_repo_recipes_file():
    files = _scanned_files()
    assert len(files) > 50  # the scan really covers the code, tests and configs
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if re.search(r"RECIPES\.md|RECIPES §", p.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []


def test_every_spec_citation_names_an_existing_section():
    existing = set(_sections())
    cite = re.compile(r"docs/spec\.md\s+sections?\s+(\d+(?:\s*(?:,|and|&)\s*\d+)*)")
    cited = []
    for p in _scanned_files():
        for m in cite.finditer(p.read_text(encoding="utf-8", errors="replace")):
            for n in re.findall(r"\d+", m.group(1)):
                cited.append((str(p.relative_to(ROOT)), int(n)))
    assert len(cited) >= 20  # the citations are found at all
    assert {n for _, n in cited} >= {1, 2, 3, 4, 5, 6, 7, 8, 9}
    assert [c for c in cited if c[1] not in existing] == []


# --------------------------------------------------------------------------- vectors, read from the page


def test_section_1_hinton_vectors():
    z_s = torch.tensor(_given(1, "z_s"), dtype=torch.float64, requires_grad=True)
    z_t = torch.tensor(_given(1, "z_t"), dtype=torch.float64)
    (T,), (y,), (lam,) = _given(1, "T"), _given(1, "y"), _given(1, "lam")
    rows = _table(1)
    assert len(rows) == 6
    kl = D.forward_kl(z_s[None], z_t[None], temperature=T)
    soft = T**2 * kl
    soft.backward()
    ce = torch.nn.functional.cross_entropy(z_s[None], torch.tensor([int(y)]))
    assert torch.softmax(z_s / T, -1).tolist() == pytest.approx(rows["`softmax_T(z_s)`"], abs=1e-6)
    assert kl.item() == pytest.approx(rows["`KL(softmax_T(z_t), softmax_T(z_s))`"][0], abs=1e-6)
    assert soft.item() == pytest.approx(rows["`T^2 * KL`"][0], abs=1e-6)
    assert z_s.grad.tolist() == pytest.approx(rows["`d(T^2 * KL) / d z_s`"], abs=1e-6)
    assert ce.item() == pytest.approx(rows["`CE(y, softmax_1(z_s))`"][0], abs=1e-6)
    assert ((1 - lam) * ce + lam * soft).item() == pytest.approx(rows["`L`"][0], abs=1e-6)


def test_section_4_single_step_reverse_kl_and_its_gradient():
    rows = _table(4)
    key = next(k for k in rows if k.startswith("`KL(q, p)`"))
    inputs = _numbers(key)  # q = softmax([3 logits]), p = [3 probabilities]
    assert len(inputs) == 6
    z = torch.tensor(inputs[:3], dtype=torch.float64, requires_grad=True)
    kl = D.reverse_kl(z, _log(inputs[3:]))
    kl.backward()
    assert kl.item() == pytest.approx(rows[key][0], abs=1e-6)
    assert z.grad.tolist() == pytest.approx(rows["its gradient with respect to the logits of `q`"], abs=1e-6)


def test_section_5_gkd_jsd_vectors():
    p_t, p_s = _log(_given(5, "p_T")), _log(_given(5, "p_S"))
    checked = 0
    for key, values in _table(5).items():
        m = re.match(r"^`JSD\((" + NUMBER + r")(?: - (" + NUMBER + r"))?\)(?: / (" + NUMBER + r"))?`", key)
        assert m, key
        beta = float(m.group(1)) - float(m.group(2) or 0.0)
        scale = float(m.group(3) or 1.0)
        got = D.jsd(p_s, p_t, beta=beta).item() / scale
        assert got == pytest.approx(values[0], abs=1e-5 if scale != 1.0 else 1e-6), key
        checked += 1
    assert checked == 7
    assert D.jsd(p_t, p_t, beta=0.5).item() == pytest.approx(0.0, abs=1e-12)
    one_hots = torch.tensor([40.0, -40.0], dtype=torch.float64), torch.tensor([-40.0, 40.0], dtype=torch.float64)
    assert D.jsd(*one_hots, beta=0.5).item() == pytest.approx(math.log(2), abs=1e-9)


def test_section_6_advantages_and_reverse_kl():
    rows = _table(6)
    pi_theta, pi_t = _given(6, "pi_theta"), _given(6, "pi_T")
    advantage = (_log(pi_t) - _log(pi_theta)).tolist()
    assert advantage == pytest.approx(rows["`A` per action"], abs=1e-6)
    assert D.reverse_kl(_log(pi_theta), _log(pi_t)).item() == pytest.approx(
        rows["`KL(pi_theta, pi_T)` (reverse KL)"][0], abs=1e-6)


def test_section_7_uld_vector():
    rows = _table(7)
    key = next(k for k in rows if k.startswith("`ULD("))
    student, teacher = (_numbers(v) for v in re.findall(r"\[([^\]]+)\]", key))
    assert len(student) != len(teacher)  # the vocabularies differ: zero padding is exercised
    got = D.uld_per_position(_log(student), _log(teacher)).item()
    assert got == pytest.approx(rows[key][0], abs=1e-9)


def test_section_7_unigram_teacher_byte_vectors():
    from kd.bytes import ByteOracle

    rows = _table(7)
    spec = re.search(r"unigram teacher over tokens `\{([^}]+)\}`", _sections()[7])
    assert spec, "docs/spec.md section 7 no longer states the unigram teacher"
    unigram = {tok.strip(): float(p) for tok, p in (item.split(":") for item in spec.group(1).split(","))}
    symbols = [tuple(tok.encode()) for tok in unigram]
    probs = torch.tensor(list(unigram.values()), dtype=torch.float64)
    oracle = ByteOracle(lambda history: probs, symbols)
    a, b = ord("a"), ord("b")
    first, after_a, after_b = oracle.next_byte(()), oracle.next_byte((), (a,)), oracle.next_byte((), (b,))
    assert [first[a].item(), first[b].item()] == pytest.approx(rows["`P(first byte = a)`, `P(first byte = b)`"])
    assert [after_a[b].item(), after_a[a].item()] == pytest.approx(rows["`P(b after a)`, `P(a after a)`"])
    assert [after_b[a].item(), after_b[b].item()] == pytest.approx(rows["`P(a after b)`, `P(b after b)`"])
    masses = [oracle.prefix_mass((), pair) for pair in ((a, a), (a, b), (b, a), (b, b))]
    assert masses == pytest.approx(rows["mass of the two-byte prefixes `aa`, `ab`, `ba`, `bb`"])
    shortcut = rows["`P(b after a)` from the single-token shortcut (wrong)"][0]
    assert after_a[b].item() != pytest.approx(shortcut, abs=1e-3)  # kd does not take the shortcut
    assert unigram["ab"] / (unigram["a"] + unigram["ab"]) == pytest.approx(shortcut)  # what the shortcut gives


def test_section_8_top_k_tail_bin_vectors():
    p_t, p_s = _given(8, "p_T"), _given(8, "p_S")
    (k,) = _given(8, "k")
    rows = _table(8)
    ids = torch.tensor([list(range(int(k)))])
    log_t, log_s = _log(p_t)[None], _log(p_s)[None]
    tail = D.TopK(ids, log_t[:, : int(k)])
    renormalised = D.TopK(ids, log_t[:, : int(k)], tail=False)
    assert D.ForwardKL()(log_s, tail).item() == pytest.approx(rows["forward KL, k + 1 bins"][0], abs=1e-6)
    assert D.ReverseKL()(log_s, tail).item() == pytest.approx(rows["reverse KL, k + 1 bins"][0], abs=1e-6)
    assert D.forward_kl(log_s, log_t).item() == pytest.approx(rows["forward KL, full vocabulary"][0], abs=1e-6)
    assert D.reverse_kl(log_s, log_t).item() == pytest.approx(rows["reverse KL, full vocabulary"][0], abs=1e-6)
    assert D.ForwardKL()(log_s, renormalised).item() == pytest.approx(
        rows["forward KL, top-k renormalised"][0], abs=1e-6)


def test_section_9_token_selection_vectors():
    text = _sections()[9]
    student = [_numbers(m) for m in re.findall(r"P\[\d\] = \[([^\]]+)\]", text)]
    teacher_own = {int(i): _numbers(v) for i, v in re.findall(r"T\[(\d)\] = \[([^\]]+)\]", text)}
    teacher = [teacher_own.get(i, student[i]) for i in range(len(student))]
    assert len(student) == 4 and len(teacher_own) == 1
    rows = _table(9)
    log_p, log_t = _log(student), _log(teacher)
    entropy = D.entropy_of(log_p)
    divergence = D.forward_kl(log_p, log_t, reduction="none")
    assert entropy.tolist() == pytest.approx(rows["student entropy per position"], abs=1e-6)
    assert divergence.tolist() == pytest.approx(rows["forward KL per position"], abs=1e-6)
    for select in ("entropy", "overconfident"):
        key = next(k for k in rows if k.startswith(f"kept by `{select}`"))
        keep = float(re.search(r"(\d+)%", key).group(1)) / 100
        kept = D.select_tokens(entropy, divergence, select, keep).tolist()
        assert kept == [int(i) for i in rows[key]], select
