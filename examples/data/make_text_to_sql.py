#!/usr/bin/env python3
"""Generate the small synthetic text-to-SQL dataset in examples/data/text-to-sql/.

The records are shaped like b-mc2/sql-create-context: a natural-language ``question``, a
``context`` of one or two ``CREATE TABLE`` statements, and the SQL ``answer``. Everything
is made up here from a fixed vocabulary with ``random.Random(SEED)``, so running this
script twice writes byte-identical files:

    python examples/data/make_text_to_sql.py [OUT_DIR]

The eval split measures the task, not the wording: it uses only table topics that never
occur in train (held-out schemas), and only question templates that train never uses
(held-out phrasings: each question type has train templates and held-out ones); the SQL
patterns and the vocabulary of comparisons, aggregates and superlatives are shared. Values in a WHERE clause appear verbatim in the question and every column of the
answer appears in the context, so the exact SQL can be inferred from question + context.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

SEED = 20240611
TRAIN_ROWS = 2000
TRAIN_SHARDS = 2
EVAL_ROWS = 120
DEFAULT_OUT = Path(__file__).resolve().parent / "text-to-sql"

# ---------------------------------------------------------------------------------------------
# Value pools
# ---------------------------------------------------------------------------------------------

# fmt: off
FIRST = [
    "James", "Maria", "Robert", "Linda", "Michael", "Sarah", "David", "Emma", "Daniel", "Olivia",
    "Thomas", "Sofia", "Kevin", "Anna", "Brian", "Laura", "Jorge", "Mei", "Ahmed", "Fatima",
    "Lucas", "Chloe", "Ivan", "Nina", "Paul", "Grace", "Omar", "Elena", "Victor", "Hannah",
    "Jean-Luc", "Mary-Kate", "Zoë", "José",
]
LAST = [
    "Smith", "Garcia", "Johnson", "Chen", "Brown", "Miller", "Davis", "Lopez", "Wilson", "Anderson",
    "Taylor", "Moore", "Martin", "Lee", "Walker", "Hall", "Young", "King", "Wright", "Scott",
    "Green", "Baker", "Adams", "Nelson", "Carter", "Mitchell", "Perez", "Turner", "Parker", "Evans",
    "O'Brien", "D'Souza", "Smith-Jones", "van Dijk",
]
CITIES = [
    "Boston", "Chicago", "Denver", "Seattle", "Austin", "Miami", "Portland", "Atlanta", "Dallas",
    "Phoenix", "London", "Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Sydney", "Toronto",
    "Dublin", "Oslo", "Lisbon", "Vienna", "Prague", "Cairo", "Lima", "New York", "San Diego",
    "Cape Town", "Hong Kong", "Buenos Aires",
]
COUNTRIES = [
    "France", "Germany", "Spain", "Italy", "Japan", "Brazil", "Canada", "Mexico", "India",
    "Australia", "Norway", "Sweden", "Egypt", "Kenya", "Chile", "Peru", "Ireland", "Portugal",
    "United States", "United Kingdom", "South Korea", "New Zealand", "Argentina", "Poland",
]
STATES = [
    "California", "Texas", "Florida", "Ohio", "Oregon", "Nevada", "Georgia", "Alabama", "Maine",
    "Utah", "Virginia", "Arizona", "Colorado", "Michigan", "New York", "Washington", "Kansas",
    "Iowa", "Vermont", "Montana",
]
ADJ = [
    "Silent", "Golden", "Hidden", "Broken", "Crimson", "Frozen", "Electric", "Distant", "Wild",
    "Quiet", "Burning", "Silver", "Lost", "Endless", "Midnight", "Northern", "Velvet", "Iron",
    "Paper", "Hollow",
]
NOUN = [
    "River", "Garden", "Storm", "Empire", "Harbor", "Forest", "Mirror", "Horizon", "Island", "Road",
    "Echo", "Valley", "Kingdom", "Shadow", "Lantern", "Ocean", "Canyon", "Compass", "Summit",
    "Meadow",
]
ANIMALS = [
    "Hawks", "Bears", "Wolves", "Tigers", "Falcons", "Eagles", "Sharks", "Lions", "Rams", "Comets",
]
# fmt: on


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def title(rng: random.Random) -> str:
    return f"The {rng.choice(ADJ)} {rng.choice(NOUN)}"


# String value kinds: a tuple is a categorical list; these names are generators.
STRING_KINDS = {
    "person": person,
    "title": title,
    "city": lambda r: r.choice(CITIES),
    "country": lambda r: r.choice(COUNTRIES),
    "state": lambda r: r.choice(STATES),
    "adj_noun": lambda r: f"{r.choice(ADJ)} {r.choice(NOUN)}",
    "team": lambda r: f"{r.choice(CITIES)} {r.choice(ANIMALS)}",
    "code": lambda r: (
        f"{r.choice('ABCDEFGHKLMNPRSTUVWZ')}{r.choice('ABCDEFGHKLMNPRSTUVWZ')}{r.randint(100, 999)}"
    ),
}


# ---------------------------------------------------------------------------------------------
# Schema vocabulary
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # VARCHAR, INTEGER or REAL
    kind: object  # STRING_KINDS key / tuple of categories (VARCHAR); (lo, hi) range (numbers)
    is_year: bool = False

    @property
    def numeric(self) -> bool:
        return self.sql_type != "VARCHAR"

    @property
    def phrase(self) -> str:
        return self.name.replace("_", " ")

    @property
    def plural(self) -> str:
        return pluralize(self.phrase)

    def value(self, rng: random.Random) -> str:
        """A value as it appears in the question (and, quoted when a string, in the SQL)."""
        if self.sql_type == "VARCHAR":
            if isinstance(self.kind, tuple):
                return rng.choice(self.kind)
            return STRING_KINDS[self.kind](rng)
        lo, hi = self.kind
        if self.sql_type == "REAL":
            return f"{rng.uniform(lo, hi):.{rng.choice((1, 1, 2))}f}"
        v = rng.randint(lo, hi)
        if not self.is_year and hi - lo >= 1000:  # round big numbers like a person would
            step = 10 ** (len(str(v)) - 2)
            v = max(step, v // step * step)
        return str(v)


@dataclass(frozen=True)
class Topic:
    table: str
    singular: str
    plural: str
    label: str  # the column that names a row ("name", "title", "model", ...)
    named: str  # how a question refers to a row by its label: "named", "titled", ...
    columns: tuple[Column, ...]
    parent: str | None = None  # a topic this one references through <parent>_id
    parent_via: str = ""  # how a question says "belongs to", e.g. "play for"

    def col(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def label_col(self) -> Column:
        return self.col(self.label)


# Short constructors keep the vocabulary tables readable.
def V(name, kind):
    return Column(name, "VARCHAR", kind)


def N(name, lo, hi):
    return Column(name, "INTEGER", (lo, hi))


def Y(name, lo, hi):
    return Column(name, "INTEGER", (lo, hi), is_year=True)


def R(name, lo, hi):
    return Column(name, "REAL", (lo, hi))


GENRES_FILM = ("Drama", "Comedy", "Horror", "Action", "Documentary", "Romance")
GENRES_MUSIC = ("Pop", "Rock", "Jazz", "Folk", "Soul", "Blues")
DEPTS = ("Sales", "Marketing", "Finance", "Engineering", "Support", "Legal")

# fmt: off
TRAIN_TOPICS = [
    Topic("player", "player", "players", "name", "named",
          (V("name", "person"), N("age", 18, 40), V("position", ("Forward", "Midfielder", "Defender", "Goalkeeper")),
           V("country", "country"), N("goals", 0, 40)), parent="team", parent_via="play for"),
    Topic("team", "team", "teams", "name", "named",
          (V("name", "team"), V("city", "city"), Y("founded_year", 1880, 2010), N("wins", 0, 82),
           V("conference", ("East", "West", "North", "South")))),
    Topic("employee", "employee", "employees", "name", "named",
          (V("name", "person"), N("age", 22, 65), V("city", "city"), N("salary", 30000, 150000),
           Y("hire_year", 1990, 2023)), parent="department", parent_via="work in"),
    Topic("department", "department", "departments", "name", "named",
          (V("name", DEPTS), N("budget", 1, 500), N("num_employees", 5, 900), Y("creation_year", 1950, 2020),
           V("city", "city"))),
    Topic("head", "head", "heads", "name", "named",
          (V("name", "person"), V("born_state", "state"), N("age", 40, 75), Y("start_year", 1990, 2022))),
    Topic("ship", "ship", "ships", "name", "named",
          (V("name", "adj_noun"), V("type", ("Cargo", "Tanker", "Frigate", "Cruiser", "Ferry")),
           N("tonnage", 1000, 90000), Y("built_year", 1950, 2020), V("flag", "country"), V("home_port", "city"))),
    Topic("film", "film", "films", "title", "titled",
          (V("title", "title"), V("director", "person"), Y("release_year", 1960, 2023), V("genre", GENRES_FILM),
           N("box_office", 1, 900), N("running_time", 80, 200))),
    Topic("school", "school", "schools", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("enrollment", 200, 3000), Y("founded_year", 1850, 2010),
           V("type", ("Public", "Private", "Charter")))),
    Topic("election", "election", "elections", "candidate", "with candidate",
          (V("candidate", "person"), V("party", ("Democratic", "Republican", "Green", "Independent", "Libertarian")),
           N("votes", 1000, 90000), Y("year", 1980, 2022), V("state", "state"))),
    Topic("airport", "airport", "airports", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), V("country", "country"), N("passengers", 10000, 900000),
           N("runways", 1, 6), Y("opened_year", 1920, 2015))),
    Topic("singer", "singer", "singers", "name", "named",
          (V("name", "person"), V("country", "country"), N("age", 18, 80), V("genre", GENRES_MUSIC),
           N("net_worth", 1, 500))),
    Topic("album", "album", "albums", "title", "titled",
          (V("title", "title"), Y("release_year", 1965, 2023), N("sales", 1000, 900000), V("genre", GENRES_MUSIC),
           V("record_label", ("Atlantic", "Columbia", "Motown", "Island", "Capitol"))),
          parent="singer", parent_via="were recorded by"),
    Topic("book", "book", "books", "title", "titled",
          (V("title", "title"), V("author", "person"), Y("publication_year", 1900, 2023), N("pages", 100, 900),
           V("publisher", ("Penguin", "HarperCollins", "Macmillan", "Scholastic", "Random House")))),
    Topic("restaurant", "restaurant", "restaurants", "name", "named",
          (V("name", "adj_noun"), V("city", "city"),
           V("cuisine", ("Italian", "Mexican", "Thai", "Indian", "French", "Greek")), R("rating", 1, 5),
           N("seats", 10, 300))),
    Topic("hospital", "hospital", "hospitals", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), V("state", "state"), N("beds", 20, 1500),
           Y("founded_year", 1850, 2015))),
    Topic("stadium", "stadium", "stadiums", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("capacity", 5000, 90000), Y("opened_year", 1900, 2020),
           V("surface", ("Grass", "Turf", "Hybrid")))),
    Topic("car", "car", "cars", "model", "with model",
          (V("model", "code"), V("manufacturer", ("Ford", "Toyota", "Honda", "BMW", "Fiat", "Volvo")),
           Y("year", 1990, 2023), N("horsepower", 70, 600), N("price", 9000, 120000),
           V("fuel_type", ("Petrol", "Diesel", "Electric", "Hybrid")))),
    Topic("store", "store", "stores", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), V("manager", "person"), N("revenue", 10000, 990000),
           N("num_staff", 3, 200)), parent="company", parent_via="are owned by"),
    Topic("company", "company", "companies", "name", "named",
          (V("name", "adj_noun"), V("industry", ("Banking", "Retail", "Energy", "Software", "Mining")),
           V("headquarters", "city"), N("employees", 10, 90000), Y("founded_year", 1850, 2020))),
    Topic("course", "course", "courses", "title", "titled",
          (V("title", ("Linear Algebra", "Organic Chemistry", "World History", "Data Structures", "Microeconomics",
                       "Music Theory", "Genetics", "Public Speaking")),
           V("instructor", "person"), N("credits", 1, 5), V("department", DEPTS), N("enrollment", 5, 400))),
    Topic("student", "student", "students", "name", "named",
          (V("name", "person"), N("age", 17, 30), V("major", ("Biology", "History", "Physics", "Economics", "Music")),
           R("gpa", 2, 4), V("city", "city"), Y("enrollment_year", 2010, 2023)),
          parent="university", parent_via="study at"),
    Topic("university", "university", "universities", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), V("state", "state"), N("enrollment", 1000, 60000),
           Y("founded_year", 1700, 2000), V("type", ("Public", "Private")))),
    Topic("museum", "museum", "museums", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), Y("open_year", 1850, 2020), N("num_staff", 5, 400),
           N("visitors", 1000, 900000))),
    Topic("river", "river", "rivers", "name", "named",
          (V("name", "adj_noun"), V("country", "country"), N("length_km", 50, 6000), N("discharge", 10, 9000))),
    Topic("mountain", "mountain", "mountains", "name", "named",
          (V("name", "adj_noun"), V("country", "country"), N("height", 1000, 8800),
           V("mountain_range", ("Alps", "Andes", "Rockies", "Himalayas", "Pyrenees")), Y("first_ascent_year", 1780, 1990))),
    Topic("product", "product", "products", "name", "named",
          (V("name", "adj_noun"), V("category", ("Toys", "Books", "Garden", "Kitchen", "Sports")),
           R("price", 1, 500), N("stock", 0, 900), V("supplier", "person"))),
    Topic("customer", "customer", "customers", "name", "named",
          (V("name", "person"), V("city", "city"), V("country", "country"), N("age", 18, 90),
           N("credit_limit", 500, 50000), V("membership", ("Gold", "Silver", "Bronze")))),
    Topic("flight", "flight", "flights", "flight_number", "with flight number",
          (V("flight_number", "code"), V("origin", "city"), V("destination", "city"), N("distance", 100, 9000),
           N("duration", 40, 900), V("airline", ("Delta", "Lufthansa", "Qantas", "Emirates", "Iberia")))),
    Topic("hotel", "hotel", "hotels", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("stars", 1, 5), N("rooms", 10, 900),
           N("price_per_night", 40, 900))),
    Topic("musician", "musician", "musicians", "name", "named",
          (V("name", "person"), V("instrument", ("Piano", "Violin", "Guitar", "Drums", "Cello")),
           V("country", "country"), N("age", 16, 85), Y("debut_year", 1960, 2022))),
    Topic("gymnast", "gymnast", "gymnasts", "name", "named",
          (V("name", "person"), V("country", "country"), N("age", 14, 32), R("floor_points", 5, 10),
           R("total_points", 30, 60))),
    Topic("train", "train", "trains", "name", "named",
          (V("name", "adj_noun"), V("origin", "city"), V("destination", "city"), N("speed", 60, 350),
           Y("built_year", 1960, 2022), V("service", ("Daily", "Weekly", "Weekend")))),
    Topic("station", "station", "stations", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("platforms", 1, 30), Y("opened_year", 1840, 2020),
           N("passengers", 1000, 900000))),
    Topic("park", "park", "parks", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("area_acres", 5, 9000), Y("established_year", 1850, 2020),
           V("type", ("National", "State", "Municipal")))),
    Topic("video_game", "video game", "video games", "title", "titled",
          (V("title", "title"), V("publisher", ("Nintendo", "Sega", "Ubisoft", "Capcom", "Konami")),
           Y("release_year", 1985, 2023), V("platform", ("PC", "Xbox", "PlayStation", "Switch")),
           N("sales", 1000, 900000), R("rating", 1, 10))),
    Topic("tv_show", "TV show", "TV shows", "title", "titled",
          (V("title", "title"), V("network", ("NBC", "CBS", "ABC", "HBO", "Fox")), N("seasons", 1, 20),
           Y("premiere_year", 1970, 2023), R("rating", 1, 10))),
    Topic("coach", "coach", "coaches", "name", "named",
          (V("name", "person"), N("age", 30, 75), V("country", "country"), N("wins", 0, 900),
           N("years_active", 1, 40)), parent="team", parent_via="work for"),
    Topic("building", "building", "buildings", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), N("floors", 2, 120), N("height_m", 10, 830),
           Y("completed_year", 1880, 2023))),
    Topic("race", "race", "races", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), Y("year", 1950, 2023), N("laps", 10, 90),
           V("winner", "person"))),
    Topic("hotel_guest", "hotel guest", "hotel guests", "name", "named",
          (V("name", "person"), V("country", "country"), N("nights", 1, 30), N("age", 18, 90),
           V("room_type", ("Single", "Double", "Suite")))),
]
# fmt: on

# Held-out schemas: none of these tables occurs in train.
# fmt: off
EVAL_TOPICS = [
    Topic("aircraft", "aircraft", "aircraft", "model", "with model",
          (V("model", "code"), V("manufacturer", ("Boeing", "Airbus", "Embraer", "Bombardier")), N("seats", 50, 600),
           N("range_km", 1000, 16000), Y("first_flight_year", 1960, 2020))),
    Topic("pilot", "pilot", "pilots", "name", "named",
          (V("name", "person"), N("age", 22, 65), V("rank", ("Captain", "First Officer", "Second Officer")),
           V("country", "country"), N("flight_hours", 200, 30000)), parent="aircraft", parent_via="fly"),
    Topic("county", "county", "counties", "name", "named",
          (V("name", "adj_noun"), V("state", "state"), N("population", 1000, 900000), N("area_sq_km", 100, 9000),
           V("county_seat", "city"))),
    Topic("bridge", "bridge", "bridges", "name", "named",
          (V("name", "adj_noun"), N("length_m", 20, 3000), Y("built_year", 1850, 2022),
           V("type", ("Suspension", "Arch", "Beam", "Truss"))), parent="county", parent_via="are located in"),
    Topic("wine", "wine", "wines", "name", "named",
          (V("name", "adj_noun"), V("grape", ("Merlot", "Chardonnay", "Syrah", "Riesling", "Malbec")),
           V("country", "country"), Y("vintage", 1980, 2022), N("price", 5, 900), N("score", 70, 100))),
    Topic("festival", "festival", "festivals", "name", "named",
          (V("name", "adj_noun"), V("city", "city"), Y("year", 1990, 2023), N("attendance", 1000, 900000),
           N("num_of_films", 5, 400))),
    Topic("phone", "phone", "phones", "model", "with model",
          (V("model", "code"), V("brand", ("Samsung", "Apple", "Nokia", "Motorola", "Xiaomi")),
           Y("release_year", 2005, 2023), N("price", 50, 2000), N("storage_gb", 8, 1024), R("screen_size", 4, 7))),
]
# fmt: on


def pluralize(phrase: str) -> str:
    """'city' -> 'cities', 'price per night' -> 'prices per night'; plurals and units stay."""
    if " per " in phrase:
        head, _, tail = phrase.partition(" per ")
        return f"{pluralize(head)} per {tail}"
    last = phrase.split()[-1]
    if phrase.endswith("s") or phrase.startswith("num ") or last in ("km", "m", "gb", "active"):
        return phrase
    if phrase.endswith("y") and phrase[-2:-1] not in ("a", "e", "o", "u"):
        return phrase[:-1] + "ies"
    if phrase.endswith(("s", "x", "ch", "sh")):
        return phrase + "es"
    return phrase + "s"


# ---------------------------------------------------------------------------------------------
# Question phrasing: every question template has a train set and a held-out set; the eval
# split asks only in held-out templates, so it measures the task, not the sentence
# frames it was taught. The words for comparisons, aggregates and superlatives are
# vocabulary, shared by both splits (a model cannot guess that "a maximum of" means <=
# from examples that never say it).
# ---------------------------------------------------------------------------------------------

OP_WORDS = {
    ">": ("greater than", "more than", "above", "larger than", "over", "exceeding", "higher than"),
    "<": ("less than", "below", "smaller than", "under", "lower than", "beneath"),
    ">=": ("at least", "no less than", "not less than", "a minimum of"),
    "<=": ("at most", "no more than", "not more than", "a maximum of"),
    "!=": ("other than", "not equal to", "different from"),
    "=": ("", "", "", "equal to"),
}
AGG_WORDS = {
    "MAX": ("maximum", "highest", "largest", "biggest"),
    "MIN": ("minimum", "lowest", "smallest", "least"),
    "AVG": ("average", "mean"),
    "SUM": ("total", "combined"),
}
DISTINCT_WORDS = ("distinct", "different", "unique")
ORDER_WORDS = {
    "ASC": ("in ascending order of {c}", "sorted by {c} from lowest to highest", "ordered by increasing {c}"),
    "DESC": (
        "in descending order of {c}",
        "sorted by {c} from highest to lowest",
        "ordered by decreasing {c}",
    ),
}
MAX_MIN_WORDS = ("maximum and minimum", "largest and smallest", "highest and lowest")
SUPERLATIVE = {
    "DESC": ("largest", "highest", "greatest", "biggest"),
    "ASC": ("smallest", "lowest", "least"),
}


class Asker:
    """Picks question templates for one split and remembers which (for the tests): train
    rows use only the train templates of each question type, eval rows only held-out ones."""

    def __init__(self, rng: random.Random, held_out: bool) -> None:
        self.rng, self.held_out = rng, held_out
        self.used: list[tuple[str, bool, int]] = []

    def word(self, options: tuple[str, ...]) -> str:
        """Vocabulary, the same for both splits."""
        return self.rng.choice(options)

    def ask(self, key: str, train: tuple[str, ...], held_out: tuple[str, ...]) -> str:
        options = held_out if self.held_out else train
        i = self.rng.randrange(len(options))
        self.used.append((key, self.held_out, i))
        return options[i]


@dataclass(frozen=True)
class Cond:
    col: Column
    op: str
    value: str
    high: str = ""  # BETWEEN value AND high

    def literal(self, v: str) -> str:
        return v if self.col.numeric else f'"{v}"'

    def sql(self, prefix: str = "") -> str:
        if self.op == "BETWEEN":
            return f"{prefix}{self.col.name} BETWEEN {self.value} AND {self.high}"
        return f"{prefix}{self.col.name} {self.op} {self.literal(self.value)}"

    def _words(self, a: Asker) -> str:
        if self.op == "BETWEEN":
            low, high = self.value, self.high
            return a.word((f"between {low} and {high}", f"from {low} to {high}"))
        word = a.word(OP_WORDS[self.op])
        return f"{word} {self.value}".strip()

    def whose(self, a: Asker) -> str:
        """'age is greater than 30' / 'position is Forward'."""
        phrase = self.col.phrase
        verb = "are" if phrase.endswith("s") and not phrase.startswith("num ") else "is"
        return f"{phrase} {verb} {self._words(a)}"

    def with_(self, a: Asker) -> str:
        """'age greater than 30' / 'position Forward'."""
        return f"{self.col.phrase} {self._words(a)}"


class Skip(Exception):
    """The pattern does not fit the topic (e.g. no numeric column); pick another."""


def pick(rng: random.Random, cols, exclude=()) -> Column:
    cols = [c for c in cols if c.name not in exclude]
    if not cols:
        raise Skip
    return rng.choice(cols)


def strings(t: Topic) -> list[Column]:
    return [c for c in t.columns if not c.numeric and c.name != t.label]


def numbers(t: Topic, years: bool = True) -> list[Column]:
    return [c for c in t.columns if c.numeric and (years or not c.is_year)]


def cond(rng: random.Random, t: Topic, exclude=(), numeric: bool | None = None) -> Cond:
    if numeric is None:
        numeric = rng.random() < 0.5
    if numeric:
        c = pick(rng, numbers(t), exclude)
        # the inclusive comparisons as often as the strict ones: "at most" vs "less than" is
        # the distinction small models miss most
        op = rng.choice((">", ">", "<", "<", "=", ">=", ">=", "<=", "<=", "BETWEEN"))
        if op == "BETWEEN":
            low, high = sorted((c.value(rng), c.value(rng)), key=float)
            if low == high:
                raise Skip
            return Cond(c, op, low, high)
    else:
        c = pick(rng, strings(t), exclude)
        op = rng.choice(("=", "=", "=", "=", "!="))
    return Cond(c, op, c.value(rng))


def target(rng: random.Random, t: Topic, exclude=()) -> Column:
    """The selected column: usually the label ("names of ..."), sometimes another column."""
    if rng.random() < 0.75 and t.label not in exclude:
        return t.label_col
    return pick(rng, t.columns, exclude)


def create_table(t: Topic, used: list[Column], rng: random.Random, extra_cols: list[Column] = ()) -> str:
    """CREATE TABLE with the used columns plus 0-2 distractors, in the topic's column order."""
    names = {c.name for c in used} | {c.name for c in extra_cols}
    rest = [c for c in t.columns if c.name not in names]
    names |= {c.name for c in rng.sample(rest, min(len(rest), rng.choice((0, 1, 1, 2))))}
    cols = [c for c in t.columns if c.name in names]
    decl = [f"{c.name} {c.sql_type}" for c in cols] + [f"{c.name} {c.sql_type}" for c in extra_cols]
    return f"CREATE TABLE {t.table} ({', '.join(decl)})"


# Each pattern returns (question, answer, used columns) for one topic.


def p_count_all(rng, t, a):
    q = a.ask(
        "count_all",
        (
            f"How many {t.plural} are there?",
            f"Tell me the number of {t.plural}.",
            f"Count the number of {t.plural}.",
            f"What is the total number of {t.plural}?",
            f"Find the number of {t.plural}.",
        ),
        (f"How many {t.plural} do we have in total?", f"Give me the count of all {t.plural}."),
    )
    return q, f"SELECT COUNT(*) FROM {t.table}", []


def p_count_where(rng, t, a):
    c = cond(rng, t)
    if c.col.name == "age" and c.op in ("<", ">") and rng.random() < 0.5:
        word = a.word(("older than", "aged over") if c.op == ">" else ("younger than", "aged under"))
        q = a.ask(
            "older",
            (f"How many {t.plural} are {word} {c.value}?", f"Count the {t.plural} who are {word} {c.value}."),
            (f"What is the number of {t.plural} {word} {c.value}?",),
        )
    else:
        q = a.ask(
            "count_where",
            (
                f"How many {t.plural} have {c.with_(a)}?",
                f"Count the number of {t.plural} whose {c.whose(a)}.",
                f"What is the total number of {t.plural} whose {c.whose(a)}?",
                f"Find the number of {t.plural} with {c.with_(a)}.",
                f"Please count the {t.plural} whose {c.whose(a)}.",
                f"I want to know how many {t.plural} have {c.with_(a)}.",
            ),
            (
                f"How many of the {t.plural} have a {c.with_(a)}?",
                f"Tell me how many {t.plural} have {c.with_(a)}.",
                f"What's the number of {t.plural} where the {c.whose(a)}?",
            ),
        )
    return q, f"SELECT COUNT(*) FROM {t.table} WHERE {c.sql()}", [c.col]


def p_select_where(rng, t, a):
    c = cond(rng, t)
    x = target(rng, t, exclude=(c.col.name,))
    q = a.ask(
        "select_where",
        (
            f"List the {x.plural} of {t.plural} whose {c.whose(a)}.",
            f"What are the {x.plural} of the {t.plural} with {c.with_(a)}?",
            f"Show the {x.plural} of all {t.plural} whose {c.whose(a)}.",
            f"Find the {x.plural} of {t.plural} with {c.with_(a)}.",
            f"Please list the {x.plural} of {t.plural} whose {c.whose(a)}.",
            f"Could you show me the {x.plural} of the {t.plural} with {c.with_(a)}?",
            f"Return the {x.plural} for {t.plural} whose {c.whose(a)}.",
        ),
        (
            f"Which {x.plural} belong to {t.plural} whose {c.whose(a)}?",
            f"Give me the {x.plural} of every {t.singular} with {c.with_(a)}.",
            f"I need the {x.plural} of the {t.plural} where the {c.whose(a)}.",
        ),
    )
    return q, f"SELECT {x.name} FROM {t.table} WHERE {c.sql()}", [x, c.col]


def p_select_by_label(rng, t, a):
    x = pick(rng, t.columns, exclude=(t.label,))
    v = t.label_col.value(rng)
    q = a.ask(
        "select_by_label",
        (
            f"What is the {x.phrase} of the {t.singular} {t.named} {v}?",
            f"Find the {x.phrase} of the {t.singular} {t.named} {v}.",
            f"Give the {x.phrase} of the {t.singular} {t.named} {v}.",
            f"Show me the {x.phrase} of the {t.singular} {t.named} {v}.",
            f"I need the {x.phrase} of the {t.singular} {t.named} {v}.",
        ),
        (
            f"Tell me the {x.phrase} of the {t.singular} {t.named} {v}.",
            f"For the {t.singular} {t.named} {v}, what is the {x.phrase}?",
        ),
    )
    return q, f'SELECT {x.name} FROM {t.table} WHERE {t.label} = "{v}"', [x, t.label_col]


def p_max_min(rng, t, a):
    c = pick(rng, numbers(t))
    mm = a.word(MAX_MIN_WORDS)
    q = a.ask(
        "max_min",
        (
            f"What are the {mm} {c.phrase} of all {t.plural}?",
            f"Show the {mm} {c.phrase} across all {t.plural}.",
            f"Find the {mm} {c.phrase} among {t.plural}.",
        ),
        (
            f"Give me the {mm} {c.phrase} over every {t.singular}.",
            f"Among the {t.plural}, what are the {mm} {c.phrase}?",
        ),
    )
    return q, f"SELECT MAX({c.name}), MIN({c.name}) FROM {t.table}", [c]


def agg_col(rng, t, a):
    agg = rng.choice(("MAX", "MIN", "AVG", "AVG", "SUM"))
    c = pick(rng, numbers(t, years=agg in ("MAX", "MIN")))
    return agg, a.word(AGG_WORDS[agg]), c


def p_agg(rng, t, a):
    agg, word, c = agg_col(rng, t, a)
    q = a.ask(
        "agg",
        (
            f"What is the {word} {c.phrase} of all {t.plural}?",
            f"Find the {word} {c.phrase} among {t.plural}.",
            f"Show the {word} {c.phrase} of the {t.plural}.",
            f"Please compute the {word} {c.phrase} of the {t.plural}.",
            f"Tell me the {word} {c.phrase} across all {t.plural}.",
        ),
        (
            f"Compute the {word} {c.phrase} over every {t.singular}.",
            f"What's the {word} {c.phrase} for {t.plural}?",
        ),
    )
    return q, f"SELECT {agg}({c.name}) FROM {t.table}", [c]


def p_agg_where(rng, t, a):
    agg, word, c = agg_col(rng, t, a)
    w = cond(rng, t, exclude=(c.name,), numeric=False)
    q = a.ask(
        "agg_where",
        (
            f"What is the {word} {c.phrase} of {t.plural} whose {w.whose(a)}?",
            f"Find the {word} {c.phrase} of {t.plural} with {w.with_(a)}.",
            f"Show the {word} {c.phrase} for {t.plural} with {w.with_(a)}.",
            f"Tell me the {word} {c.phrase} of the {t.plural} whose {w.whose(a)}.",
            f"For {t.plural} with {w.with_(a)}, what is the {word} {c.phrase}?",
        ),
        (
            f"Among {t.plural} whose {w.whose(a)}, what is the {word} {c.phrase}?",
            f"Compute the {word} {c.phrase} of the {t.plural} where the {w.whose(a)}.",
        ),
    )
    return q, f"SELECT {agg}({c.name}) FROM {t.table} WHERE {w.sql()}", [c, w.col]


def p_argmax(rng, t, a):
    c = pick(rng, numbers(t))
    order = rng.choice(("DESC", "ASC"))
    x = target(rng, t, exclude=(c.name,))
    if c.name == "age" and x is t.label_col and rng.random() < 0.4:
        old = order == "DESC"
        word = "oldest" if old else "youngest"
        q = a.ask(
            "oldest",
            (
                f"What is the {x.phrase} of the {word} {t.singular}?",
                f"Find the {x.phrase} of the {word} {t.singular}.",
            ),
            (f"Give me the {x.phrase} of the {word} {t.singular}.",),
        )
    elif x is t.label_col and rng.random() < 0.4:
        sup = a.word(SUPERLATIVE[order])
        q = a.ask(
            "argmax_which",
            (f"Which {t.singular} has the {sup} {c.phrase}?",),
            (f"Name the {t.singular} with the {sup} {c.phrase}.",),
        )
    else:
        sup = a.word(SUPERLATIVE[order])
        q = a.ask(
            "argmax",
            (
                f"What is the {x.phrase} of the {t.singular} with the {sup} {c.phrase}?",
                f"Find the {x.phrase} of the {t.singular} that has the {sup} {c.phrase}.",
                f"Return the {x.phrase} of the {t.singular} with the {sup} {c.phrase}.",
                f"Show me the {x.phrase} of the {t.singular} having the {sup} {c.phrase}.",
                f"I need the {x.phrase} of the {t.singular} whose {c.phrase} is the {sup}.",
            ),
            (
                f"Tell me the {x.phrase} of whichever {t.singular} has the {sup} {c.phrase}.",
                f"For the {t.singular} with the {sup} {c.phrase}, give its {x.phrase}.",
            ),
        )
    by = f"{c.name} DESC" if order == "DESC" else c.name  # ascending is written without ASC
    return q, f"SELECT {x.name} FROM {t.table} ORDER BY {by} LIMIT 1", [x, c]


def p_order(rng, t, a):
    c = pick(rng, numbers(t))
    x = target(rng, t, exclude=(c.name,))
    order = rng.choice(("ASC", "DESC"))
    how = a.word(ORDER_WORDS[order]).format(c=c.phrase)
    q = a.ask(
        "order",
        (
            f"List the {x.plural} of all {t.plural} {how}.",
            f"Show the {x.plural} of {t.plural} {how}.",
            f"Return the {x.plural} of the {t.plural} {how}.",
        ),
        (
            f"Give me the {x.plural} of the {t.plural}, {how}.",
            f"What are the {x.plural} of the {t.plural} {how}?",
        ),
    )
    by = f"{c.name} DESC" if order == "DESC" else c.name
    return q, f"SELECT {x.name} FROM {t.table} ORDER BY {by}", [x, c]


def p_top_n(rng, t, a):
    c = pick(rng, numbers(t))
    n = rng.randint(2, 5)
    x = target(rng, t, exclude=(c.name,))
    if rng.random() < 0.35:
        q = a.ask(
            "bottom_n",
            (
                f"List the {x.plural} of the {n} {t.plural} with the lowest {c.phrase}.",
                f"What are the {x.plural} of the bottom {n} {t.plural} by {c.phrase}?",
            ),
            (
                f"Give me the {x.plural} of the {n} {t.plural} with the {a.word(SUPERLATIVE['ASC'])} {c.phrase}.",
            ),
        )
        return q, f"SELECT {x.name} FROM {t.table} ORDER BY {c.name} LIMIT {n}", [x, c]
    q = a.ask(
        "top_n",
        (
            f"List the {x.plural} of the top {n} {t.plural} with the highest {c.phrase}.",
            f"What are the {x.plural} of the {n} {t.plural} with the largest {c.phrase}?",
        ),
        (f"Give me the {x.plural} of the {n} {t.plural} with the {a.word(SUPERLATIVE['DESC'])} {c.phrase}.",),
    )
    return q, f"SELECT {x.name} FROM {t.table} ORDER BY {c.name} DESC LIMIT {n}", [x, c]


def p_distinct(rng, t, a):
    c = pick(rng, strings(t))
    w = a.word(DISTINCT_WORDS)
    q = a.ask(
        "distinct",
        (
            f"What are the {w} {c.plural} of all {t.plural}?",
            f"List all the {w} {c.plural} of {t.plural}.",
            f"Show all {w} {c.plural} among {t.plural}.",
        ),
        (
            f"Give me the {w} {c.plural} found among the {t.plural}.",
            f"Which {w} {c.plural} do the {t.plural} have?",
        ),
    )
    return q, f"SELECT DISTINCT {c.name} FROM {t.table}", [c]


def p_count_distinct(rng, t, a):
    c = pick(rng, strings(t))
    w = a.word(DISTINCT_WORDS)
    q = a.ask(
        "count_distinct",
        (
            f"How many {w} {c.plural} are there among {t.plural}?",
            f"Count the number of {w} {c.plural} of {t.plural}.",
        ),
        (f"What is the number of {w} {c.plural} of the {t.plural}?",),
    )
    return q, f"SELECT COUNT(DISTINCT {c.name}) FROM {t.table}", [c]


def p_and(rng, t, a):
    c1 = cond(rng, t, numeric=False)
    c2 = cond(rng, t, exclude=(c1.col.name,))
    if rng.random() < 0.3:
        q = a.ask(
            "and_count",
            (f"How many {t.plural} have {c1.with_(a)} and {c2.with_(a)}?",),
            (f"Count the {t.plural} with both {c1.with_(a)} and {c2.with_(a)}.",),
        )
        return q, f"SELECT COUNT(*) FROM {t.table} WHERE {c1.sql()} AND {c2.sql()}", [c1.col, c2.col]
    x = target(rng, t, exclude=(c1.col.name, c2.col.name))
    q = a.ask(
        "and",
        (
            f"List the {x.plural} of {t.plural} whose {c1.whose(a)} and whose {c2.whose(a)}.",
            f"What are the {x.plural} of the {t.plural} with {c1.with_(a)} and {c2.with_(a)}?",
            f"Show me the {x.plural} of the {t.plural} whose {c1.whose(a)} and whose {c2.whose(a)}.",
            f"Find the {x.plural} of {t.plural} that have {c1.with_(a)} and {c2.with_(a)}.",
        ),
        (
            f"Which {x.plural} belong to {t.plural} with {c1.with_(a)} as well as {c2.with_(a)}?",
            f"Give me the {x.plural} of {t.plural} where the {c1.whose(a)} and the {c2.whose(a)}.",
        ),
    )
    return q, f"SELECT {x.name} FROM {t.table} WHERE {c1.sql()} AND {c2.sql()}", [x, c1.col, c2.col]


def p_or(rng, t, a):
    """Two values of one string column."""
    c = pick(rng, strings(t))
    v1, v2 = c.value(rng), c.value(rng)
    if v1 == v2:
        raise Skip
    x = target(rng, t, exclude=(c.name,))
    q = a.ask(
        "or",
        (
            f"List the {x.plural} of {t.plural} whose {c.phrase} is {v1} or {v2}.",
            f"What are the {x.plural} of the {t.plural} with {c.phrase} {v1} or {c.phrase} {v2}?",
        ),
        (f"Which {x.plural} belong to {t.plural} whose {c.phrase} is either {v1} or {v2}?",),
    )
    where = f'{c.name} = "{v1}" OR {c.name} = "{v2}"'
    return q, f"SELECT {x.name} FROM {t.table} WHERE {where}", [x, c]


def p_group(rng, t, a):
    c = pick(rng, strings(t))
    r = rng.random()
    if r < 0.25:
        q = a.ask(
            "group_top",
            (
                f"Which {c.phrase} has the most {t.plural}?",
                f"What is the most common {c.phrase} among {t.plural}?",
            ),
            (f"Which {c.phrase} do the most {t.plural} have?",),
        )
        return q, f"SELECT {c.name} FROM {t.table} GROUP BY {c.name} ORDER BY COUNT(*) DESC LIMIT 1", [c]
    if r < 0.45:
        n = rng.randint(1, 9)
        q = a.ask(
            "having",
            (
                f"Which {c.plural} have more than {n} {t.plural}?",
                f"List the {c.plural} with more than {n} {t.plural}.",
            ),
            (f"Find each {c.phrase} with over {n} {t.plural}.",),
        )
        return q, f"SELECT {c.name} FROM {t.table} GROUP BY {c.name} HAVING COUNT(*) > {n}", [c]
    q = a.ask(
        "group",
        (
            f"How many {t.plural} are there for each {c.phrase}?",
            f"Show each {c.phrase} and the number of {t.plural}.",
            f"For each {c.phrase}, count the number of {t.plural}.",
        ),
        (f"Give the number of {t.plural} for every {c.phrase}.",),
    )
    return q, f"SELECT {c.name}, COUNT(*) FROM {t.table} GROUP BY {c.name}", [c]


PATTERNS = [  # (pattern, weight)
    (p_count_all, 3),
    (p_count_where, 11),
    (p_select_where, 14),
    (p_select_by_label, 7),
    (p_max_min, 4),
    (p_agg, 6),
    (p_agg_where, 8),
    (p_argmax, 8),
    (p_order, 4),
    (p_top_n, 4),
    (p_distinct, 4),
    (p_count_distinct, 3),
    (p_and, 9),
    (p_or, 4),
    (p_group, 7),
]
JOIN_RATE = 0.2  # of the rows whose topic has a parent table (a few percent overall)


def join_row(rng, child: Topic, parent: Topic, a: Asker):
    key = Column(f"{parent.table}_id", "VARCHAR", "code")
    on = f"T1.{key.name} = T2.{key.name}"
    frm = f"FROM {child.table} AS T1 JOIN {parent.table} AS T2 ON {on}"
    a_parent = ("an " if parent.singular[0] in "aeiou" else "a ") + parent.singular
    kind = rng.choice(("names", "names", "count", "parent"))
    if kind == "parent":  # the parent's label for a child named by its label
        v = child.label_col.value(rng)
        p, c = parent, child
        q = a.ask(
            "join_parent",
            (
                f"What is the {p.label_col.phrase} of the {p.singular} of the {c.singular} {c.named} {v}?",
                f"Find the {p.label_col.phrase} of the {p.singular} for the {c.singular} {c.named} {v}.",
            ),
            (f"For the {c.singular} {c.named} {v}, give the {p.label_col.phrase} of its {p.singular}.",),
        )
        answer = f'SELECT T2.{parent.label} {frm} WHERE T1.{child.label} = "{v}"'
        child_used, parent_used = [child.label_col], [parent.label_col]
    else:
        c = cond(rng, parent, exclude=(parent.label,))
        where = f"WHERE {c.sql('T2.')}"
        if kind == "count":
            q = a.ask(
                "join_count",
                (
                    f"How many {child.plural} {child.parent_via} {a_parent} whose {c.whose(a)}?",
                    f"Count the {child.plural} that {child.parent_via} {a_parent} with {c.with_(a)}.",
                ),
                (
                    f"What is the number of {child.plural} that {child.parent_via} {a_parent} with {c.with_(a)}?",
                ),
            )
            answer = f"SELECT COUNT(*) {frm} {where}"
            child_used = []
        else:
            x = child.label_col
            q = a.ask(
                "join_names",
                (
                    f"List the {x.plural} of {child.plural} that {child.parent_via} {a_parent} whose {c.whose(a)}.",
                    f"What are the {x.plural} of the {child.plural} that {child.parent_via} {a_parent} "
                    f"with {c.with_(a)}?",
                ),
                (
                    f"Give the {x.plural} of all {child.plural} that {child.parent_via} {a_parent} with {c.with_(a)}.",
                ),
            )
            answer = f"SELECT T1.{x.name} {frm} {where}"
            child_used = [x]
        parent_used = [c.col]
    # like sql-create-context, join keys come last and distractors are few
    context = (
        f"{create_table(child, child_used, rng, [key])}; {create_table(parent, parent_used, rng, [key])}"
    )
    return q, context, answer


def make_row(rng: random.Random, topics: list[Topic], a: Asker) -> tuple[str, str, str]:
    by_table = {t.table: t for t in topics}
    while True:
        t = rng.choice(topics)
        mark = len(a.used)
        try:
            if t.parent and rng.random() < JOIN_RATE:
                return join_row(rng, t, by_table[t.parent], a)
            fn = rng.choices([p for p, _ in PATTERNS], weights=[w for _, w in PATTERNS])[0]
            q, answer, used = fn(rng, t, a)
        except Skip:
            del a.used[mark:]  # a skipped row's wording was never used
            continue
        # COUNT(*) over a whole table names no column; show one or two anyway
        return q, create_table(t, used or [t.label_col], rng), answer


def make_split(
    rng: random.Random, topics: list[Topic], n: int, prefix: str, width: int, held_out: bool
) -> tuple[list[dict], set]:
    """n rows, and the phrasings they used ((choice, held out?, index) triples)."""
    rows, seen, phrasings = [], set(), set()
    while len(rows) < n:
        a = Asker(rng, held_out)
        q, context, answer = make_row(rng, topics, a)
        if q in seen:
            continue
        seen.add(q)
        phrasings.update(a.used)
        rows.append(
            {"id": f"{prefix}-{len(rows):0{width}d}", "question": q, "context": context, "answer": answer}
        )
    return rows, phrasings


def splits() -> dict[str, tuple[list[dict], set]]:
    """train: train topics in train phrasings; eval: held-out topics in held-out phrasings."""
    return {
        "train": make_split(random.Random(SEED), TRAIN_TOPICS, TRAIN_ROWS, "t", 6, held_out=False),
        "eval": make_split(random.Random(SEED + 1), EVAL_TOPICS, EVAL_ROWS, "e", 5, held_out=True),
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_dataset(out_dir: Path) -> None:
    """(Re)write train/train-0000{0,1}.jsonl and eval/eval.jsonl under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = splits()
    train, evals = made["train"][0], made["eval"][0]
    per_shard = -(-len(train) // TRAIN_SHARDS)
    for i in range(TRAIN_SHARDS):
        write_jsonl(out_dir / "train" / f"train-{i:05d}.jsonl", train[i * per_shard : (i + 1) * per_shard])
    write_jsonl(out_dir / "eval" / "eval.jsonl", evals)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else DEFAULT_OUT
    write_dataset(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
