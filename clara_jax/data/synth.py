"""The generated world: clara_jax's embedded default data, made here from a seed.

A world is a small knowledge base of fictional people, cities, teams and companies with
relations between them (born in, plays for, works for, sibling of, based in, ...), written
as short encyclopedic documents, one per entity. From it come:

* `stage1_{split}.jsonl`: per document its QA pairs (`qa`) and a reworded version of the
  document (`paraphrase`);
* `stage1_2_{split}.jsonl`: question, `k` documents (the gold among them), answer;
* `stage2_{split}.jsonl`: question, `candidates` documents, answer, `pos_index`;
* `lm.txt`: plain text for pretraining the base LM (the world's documents in several
  wordings, plus documents of other, fresh worlds for language without these facts);
* `corpus.jsonl`: `{"id", "text"}` per document (for `clara-jax index`);
* `manifest.json`: sizes, files, row counts, and per question its kind (`single` /
  `multi`), gold and bridge document, and **clue words**.

Multi-hop questions name a person but ask about an entity linked to that person ("In
which city is the team of Ama Kestrel based?"); the answer lives in the linked entity's
document, whose name never appears in the question. Those name words are the clues: a
reasoner that retrieves the right document must have encoded them, which the logit lens
can measure, while BM25 over the question's words cannot find that document.

Train and test split the questions, not the documents: every document is in both, and a
test question asks something no training question asks (another attribute, or the same
attribute through another chain).

Fresh worlds (`iter_fresh_rows`) draw new names and facts per world, so training on them
rewards reading the document and never memorising it (see FEASIBILITY.md in the project's
reference notes). All text is produced by the templates below.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import re
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from clara_jax import paths
from clara_jax.data.formats import (
  STAGE1,
  STAGE1_2,
  STAGE2,
  check_output_dir,
  validate_row,
  write_jsonl_atomic,
)

_ONSETS = (
  "b",
  "br",
  "d",
  "dr",
  "f",
  "g",
  "k",
  "kr",
  "l",
  "m",
  "n",
  "p",
  "r",
  "s",
  "st",
  "t",
  "th",
  "v",
  "z",
  "h",
  "j",
  "sh",
  "tr",
  "gr",
  "c",
  "w",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "sk", "v")
_MASCOTS = (
  "Owls",
  "Foxes",
  "Herons",
  "Wolves",
  "Otters",
  "Ravens",
  "Hawks",
  "Lynxes",
  "Badgers",
  "Falcons",
  "Stags",
  "Comets",
  "Pilots",
  "Rangers",
  "Mariners",
  "Giants",
  "Rockets",
  "Wardens",
  "Lanterns",
  "Anchors",
)
_FIRMS = (
  "Works",
  "Labs",
  "Foods",
  "Motors",
  "Textiles",
  "Press",
  "Systems",
  "Mills",
  "Instruments",
  "Shipping",
)
_PRODUCTS = (
  "bicycles",
  "lamps",
  "maps",
  "soap",
  "kites",
  "clocks",
  "tea",
  "boots",
  "radios",
  "paper",
  "glass",
  "rope",
  "cheese",
  "pianos",
  "tents",
  "ink",
  "bricks",
  "violins",
  "sails",
  "honey",
)
_COLOURS = (
  "red",
  "blue",
  "green",
  "yellow",
  "purple",
  "orange",
  "white",
  "black",
  "silver",
  "gold",
  "grey",
  "brown",
)
_SPORTS = ("football", "hockey", "rugby", "basketball", "handball", "cricket")
YEARS = (1820, 2010)

STAGE1_NAME, STAGE1_2_NAME, STAGE2_NAME = STAGE1, STAGE1_2, STAGE2
LM_WORLD_FILE = "lm_world.txt"  # the world's own LM text (its facts, no fresh worlds)


@dataclasses.dataclass(frozen=True)
class WorldSize:
  """How many entities of each kind a world has."""

  people: int
  cities: int
  teams: int
  companies: int


SIZES = {
  "tiny": WorldSize(people=24, cities=6, teams=6, companies=6),
  "small": WorldSize(people=96, cities=12, teams=12, companies=12),
  "base": WorldSize(people=400, cities=30, teams=30, companies=30),
}


@dataclasses.dataclass(frozen=True)
class WorldOptions:
  """What a world's questions and candidates test.

  The "hidden" world (the default) is built so that only the model's knowledge can find
  a multi-hop question's document: every candidate is of the gold's kind, the bridge
  documents (those of the entities on the question's chain) are never candidates, chains
  have one or two links, the answer document never names the person asked about, and
  held-out persons' chains occur in no training row although their facts are in the LM
  text. The "classic" world keeps the bridge among the candidates, mixes kinds and has
  one-link chains only (BM25 finds its bridge, a kind prior gets Recall@5 1.0)."""

  hard_negatives: bool = True  # candidates of the gold's kind first (then other kinds)
  closed_bridge: bool = True  # bridge documents are never candidates
  two_link: bool = True  # X -> sibling -> linked entity questions beside one-link ones
  heldout_people: float = 0.25  # share of persons every question of whose chain is test
  own_names: bool = True  # pool names: this world's half, fresh worlds the other half


WORLDS = {
  "hidden": WorldOptions(),
  # The hidden world whose fresh worlds rebind its names (reading is then learned
  # on the very names the world uses; knowledge of them is contradicted).
  "hidden_shared_names": WorldOptions(own_names=False),
  "classic": WorldOptions(
    hard_negatives=False, closed_bridge=False, two_link=False, heldout_people=0.0, own_names=False
  ),
}


def world_options(world: Union[str, WorldOptions]) -> WorldOptions:
  """A name of WORLDS, or WorldOptions as they are."""
  if isinstance(world, WorldOptions):
    return world
  if world not in WORLDS:
    raise ValueError(f"unknown world {world!r}; known: {sorted(WORLDS)}")
  return WORLDS[world]


@dataclasses.dataclass
class Entity:
  """One entity and its document. `facts`: attribute -> value text; `links`: attribute
  -> id of the linked entity (its name is also the fact's value)."""

  id: str
  kind: str
  name: str
  facts: Dict[str, str]
  links: Dict[str, str]
  text: str = ""
  paraphrase: str = ""


@dataclasses.dataclass
class Question:
  """A question about the world. `gold`: the document holding the answer; `bridge`: for
  multi-hop questions, the document of the entity the question names; `chain`: the
  entities from the named one to the gold's (one-link: [X, gold]; two-link: [X, sibling,
  gold]); `clues`: words of the gold document's entity name that the question does not
  contain; `bridge_clues`: name words of the chain's inner entities (two-link: the
  sibling), which the question never says; `seen`: a test question whose (named entity,
  gold) pair a training question also has."""

  id: str
  text: str
  answer: str
  kind: str  # "single" | "multi"
  attribute: str
  gold: str
  bridge: Optional[str]
  clues: List[str]
  split: str = "train"
  hops: str = "single"  # "single" | "one_link" | "two_link"
  chain: List[str] = dataclasses.field(default_factory=list)
  bridge_clues: List[str] = dataclasses.field(default_factory=list)
  seen: bool = True

  @property
  def template(self) -> str:
    """Questions that share a template ask the same thing of different entities."""
    return f"{self.hops}:{self.attribute}"


@dataclasses.dataclass
class World:
  seed: int
  entities: Dict[str, Entity]
  questions: List[Question]
  names: str = "syllables"
  options: WorldOptions = WorldOptions()

  def docs(self) -> List[Entity]:
    return list(self.entities.values())


class _Names:
  """Unique pronounceable fictional names from syllables: every world its own names."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    self.used: Set[str] = set()

  def word(self, syllables: Tuple[int, int] = (2, 3)) -> str:
    for _ in range(1000):
      n = self.rng.randint(*syllables)
      parts = [self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) for _ in range(n - 1)]
      parts.append(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS))
      word = "".join(parts).capitalize()
      if word.lower() not in self.used and len(word) >= 4:
        self.used.add(word.lower())
        return word
    raise RuntimeError("name space exhausted; use a smaller world")

  def city(self) -> str:
    return self.word()

  def river(self) -> str:
    return self.word((2, 2))

  def brand(self) -> str:  # the first word of a team's or a company's name
    return self.word((2, 2))

  def person(self) -> str:
    return f"{self.word((1, 2))} {self.word((2, 2))}"


# The fixed name pool (`names="pool"`): every world draws its names from the same few
# hundred words, which the tokenizer keeps as single pieces (`pool_symbols`). A world
# binds them to new facts, so nothing carries over between worlds except the skill of
# reading, and reading a name is copying one token instead of a string of syllable
# pieces (which a small model learns far too slowly; docs/results.md, "Single-token names vs
# syllable names").
_POOL_SIZES = {"first": 64, "last": 64, "place": 72, "brand": 72}


@functools.lru_cache(maxsize=1)
def name_pool() -> Dict[str, Tuple[str, ...]]:
  """{category: words} of the fixed pool (the same on every machine and call)."""
  names = _Names(random.Random("clara-name-pool"))
  return {
    category: tuple(names.word((1, 2) if category == "first" else (2, 2)) for _ in range(n))
    for category, n in _POOL_SIZES.items()
  }


def pool_symbols() -> List[str]:
  """The pool's words as SentencePiece user symbols ("\u2581" marks the preceding
  space, so a name after a space is one piece)."""
  return ["\u2581" + w for words in name_pool().values() for w in words]


def pool_part(part: Optional[str]) -> Dict[str, Tuple[str, ...]]:
  """The whole pool (None) or one half of every category: "main" for the world a
  pipeline is asked about, "fresh" for the fresh worlds that teach reading, so those
  never rebind the main world's names to other facts."""
  pool = name_pool()
  if part is None:
    return pool
  if part not in ("main", "fresh"):
    raise ValueError(f"unknown pool part {part!r}; known: main, fresh")
  half = lambda words: words[: len(words) // 2] if part == "main" else words[len(words) // 2 :]
  return {category: half(words) for category, words in pool.items()}


class _PoolNames:
  """Names drawn without replacement from the fixed pool (see `name_pool`)."""

  def __init__(self, rng: random.Random, part: Optional[str] = None):
    self.rng = rng
    self.pool = pool_part(part)
    self.free = {c: self.rng.sample(words, len(words)) for c, words in self.pool.items()}
    self.people: Set[str] = set()

  def _take(self, category: str) -> str:
    if not self.free[category]:
      raise RuntimeError(
        f"the name pool has only {len(self.pool[category])} {category} names; use a smaller world"
      )
    return self.free[category].pop()

  def city(self) -> str:
    return self._take("place")

  def river(self) -> str:
    return self._take("place")

  def brand(self) -> str:
    return self._take("brand")

  def person(self) -> str:
    for _ in range(1000):
      pool = self.pool
      name = f"{self.rng.choice(pool['first'])} {self.rng.choice(pool['last'])}"
      if name not in self.people:
        self.people.add(name)
        return name
    raise RuntimeError("the name pool has too few people; use a smaller world")


_NAMERS = {"syllables": _Names, "pool": _PoolNames}


def _year(rng: random.Random) -> str:
  return str(rng.randint(*YEARS))


def _make_entities(
  rng: random.Random, size: WorldSize, names: str, part: Optional[str] = None
) -> Dict[str, Entity]:
  if names not in _NAMERS:
    raise ValueError(f"unknown names {names!r}; known: {sorted(_NAMERS)}")
  namer: _PoolNames | _Names = _PoolNames(rng, part) if names == "pool" else _Names(rng)
  cities = [
    Entity(
      f"city{i}",
      "city",
      namer.city(),
      {"river": namer.river(), "population": f"{rng.randint(12, 950)} thousand"},
      {},
    )
    for i in range(size.cities)
  ]
  mascots = rng.sample(_MASCOTS, min(len(_MASCOTS), size.teams))
  team = lambda i: (
    f"{namer.brand()} {mascots[i % len(mascots)]}",
    {"founded": _year(rng), "colour": rng.choice(_COLOURS), "sport": rng.choice(_SPORTS)},
  )
  teams = _in_cities("team", size.teams, cities, rng, team)
  company = lambda i: (
    f"{namer.brand()} {rng.choice(_FIRMS)}",
    {"founded": _year(rng), "product": rng.choice(_PRODUCTS)},
  )
  companies = _in_cities("company", size.companies, cities, rng, company)
  people = [_person(i, rng, namer, cities, teams, companies) for i in range(size.people)]
  _pair_siblings(rng, people)
  return {e.id: e for e in cities + teams + companies + people}


def _in_cities(
  kind: str,
  count: int,
  cities: List[Entity],
  rng: random.Random,
  name_and_facts: Callable[[int], Tuple[str, Dict[str, str]]],
) -> List[Entity]:
  """`count` entities of `kind`, each in a random city; `name_and_facts(i)` gives the
  i-th one's name and its facts besides the city."""
  entities = []
  for i in range(count):
    city = rng.choice(cities)
    name, facts = name_and_facts(i)
    entities.append(
      Entity(f"{kind}{i}", kind, name, {"city": city.name, **facts}, {"city": city.id})
    )
  return entities


def _person(
  i: int,
  rng: random.Random,
  namer: _PoolNames | _Names,
  cities: List[Entity],
  teams: List[Entity],
  companies: List[Entity],
) -> Entity:
  """The i-th person: born in a random city; even ones play for a team, odd ones work
  for a company."""
  city = rng.choice(cities)
  facts = {"born": _year(rng), "birthplace": city.name}
  links = {"birthplace": city.id}
  if i % 2 == 0:
    team = rng.choice(teams)
    facts["team"], links["team"] = team.name, team.id
  else:
    company = rng.choice(companies)
    facts["employer"], links["employer"] = company.name, company.id
  return Entity(f"person{i}", "person", namer.person(), facts, links)


def _pair_siblings(rng: random.Random, people: List[Entity]) -> None:
  """Pairs the people up at random as siblings (one left over when odd)."""
  order = list(range(len(people)))
  rng.shuffle(order)
  for a, b in zip(order[0::2], order[1::2]):
    pa, pb = people[a], people[b]
    pa.facts["sibling"], pa.links["sibling"] = pb.name, pb.id
    pb.facts["sibling"], pb.links["sibling"] = pa.name, pa.id


# Sentences per attribute, several wordings each: {n} the entity's name, {v} the value.
_SENTENCES = {
  ("person", "born"): (
    "{n} was born in {v}.",
    "{n} is a person born in the year {v}.",
    "The birth year of {n} is {v}.",
  ),
  ("person", "birthplace"): (
    "{n} comes from {v}.",
    "{n} was born in the city of {v}.",
    "The hometown of {n} is {v}.",
  ),
  ("person", "team"): (
    "{n} plays for the {v}.",
    "{n} is a player of the {v}.",
    "The team of {n} is the {v}.",
  ),
  ("person", "employer"): (
    "{n} works for {v}.",
    "{n} is employed by {v}.",
    "The employer of {n} is {v}.",
  ),
  ("person", "sibling"): (
    "The sibling of {n} is {v}.",
    "{n} has a sibling named {v}.",
    "{v} is the sibling of {n}.",
  ),
  ("city", "river"): (
    "{n} lies on the {v} river.",
    "The {v} river flows through {n}.",
    "The river of {n} is the {v}.",
  ),
  ("city", "population"): (
    "{n} has {v} residents.",
    "About {v} people live in {n}.",
    "The population of {n} is {v}.",
  ),
  ("team", "city"): (
    "The {n} are based in {v}.",
    "The {n} play their games in {v}.",
    "The home city of the {n} is {v}.",
  ),
  ("team", "founded"): (
    "The {n} were founded in {v}.",
    "The {n} club dates from {v}.",
    "The {n} first played in {v}.",
  ),
  ("team", "colour"): (
    "The {n} wear {v}.",
    "The colour of the {n} is {v}.",
    "The {n} play in {v} shirts.",
  ),
  ("team", "sport"): (
    "The {n} are a {v} team.",
    "The {n} play {v}.",
    "The sport of the {n} is {v}.",
  ),
  ("company", "city"): (
    "{n} is headquartered in {v}.",
    "{n} has its head office in {v}.",
    "The headquarters of {n} are in {v}.",
  ),
  ("company", "founded"): (
    "{n} was founded in {v}.",
    "{n} opened in {v}.",
    "{n} started business in {v}.",
  ),
  ("company", "product"): (
    "{n} makes {v}.",
    "{n} produces {v}.",
    "The main product of {n} is {v}.",
  ),
}

# Single-hop questions per (kind, attribute).
_ASK = {
  ("person", "born"): ("In which year was {n} born?", "When was {n} born?"),
  ("person", "birthplace"): ("Where was {n} born?", "Which city does {n} come from?"),
  ("person", "team"): ("Which team does {n} play for?",),
  ("person", "employer"): ("Which company does {n} work for?",),
  ("person", "sibling"): ("Who is the sibling of {n}?",),
  ("city", "river"): ("Which river flows through {n}?",),
  ("city", "population"): ("How many people live in {n}?",),
  ("team", "city"): ("In which city are the {n} based?",),
  ("team", "founded"): ("When were the {n} founded?",),
  ("team", "colour"): ("What colour do the {n} wear?",),
  ("team", "sport"): ("Which sport do the {n} play?",),
  ("company", "city"): ("Where is {n} headquartered?",),
  ("company", "founded"): ("When was {n} founded?",),
  ("company", "product"): ("What does {n} make?",),
}

# Multi-hop: (person link, attribute of the linked entity) -> wordings; {n} the person.
_ASK_VIA = {
  ("team", "city"): ("In which city is the team of {n} based?",),
  ("team", "founded"): ("When was the team of {n} founded?",),
  ("team", "colour"): ("What colour does the team of {n} wear?",),
  ("team", "sport"): ("Which sport does the team of {n} play?",),
  ("employer", "city"): ("Where is the employer of {n} headquartered?",),
  ("employer", "founded"): ("When was the employer of {n} founded?",),
  ("employer", "product"): ("What does the employer of {n} make?",),
  ("birthplace", "river"): ("Which river flows through the hometown of {n}?",),
  ("birthplace", "population"): ("How many people live in the hometown of {n}?",),
  ("sibling", "born"): ("In which year was the sibling of {n} born?",),
  ("sibling", "birthplace"): ("Where was the sibling of {n} born?",),
}

_WORD = re.compile(r"[A-Za-z0-9]+")
_QA_LINES = (
  "{d} Question: {q} Answer: {a}",
  "[INST] Background: {d} Question:{q} [/INST] {a}",
  "[INST] Background: {d} means the same as [/INST] Question: {q} Answer: {a}",
)


def _words(text: str) -> List[str]:
  return [w.lower() for w in _WORD.findall(text)]


def _render(rng: random.Random, e: Entity, variant: Optional[int]) -> str:
  """The entity's document: one sentence per fact, wording and order from the rng. A
  person is named in full once, then by first name (shorter documents)."""
  attrs = list(e.facts)
  rng.shuffle(attrs)
  sentences = []
  for i, attr in enumerate(attrs):
    options = _SENTENCES[(e.kind, attr)]
    choice = options[variant % len(options)] if variant is not None else rng.choice(options)
    name = e.name if i == 0 or e.kind != "person" else e.name.split()[0]
    sentences.append(choice.format(n=name, v=e.facts[attr]))
  return " ".join(sentences)


def _name_words(e: Entity) -> List[str]:
  """The words of an entity's name as documents spell them (the tokenizer's pieces of
  "Kestrel" and "kestrel" differ)."""
  return list(dict.fromkeys(_WORD.findall(e.name)))


def _not_in(words: Sequence[str], text: str) -> List[str]:
  said = set(_words(text))
  return [w for w in words if w.lower() not in said]


def _questions(
  rng: random.Random, ents: Dict[str, Entity], options: WorldOptions
) -> List[Question]:
  out: List[Optional[Question]] = []
  for e in ents.values():
    for attr, value in e.facts.items():
      template = rng.choice(_ASK[(e.kind, attr)])
      out.append(
        Question(f"{e.id}.{attr}", template.format(n=e.name), value, "single", attr, e.id, None, [])
      )
    if e.kind != "person":
      continue
    for (link, attr), templates in _ASK_VIA.items():
      if link not in e.links:
        continue
      target = ents[e.links[link]]
      if attr not in target.facts:
        continue
      text = rng.choice(templates).format(n=e.name)
      out.append(
        _chain_question(f"{e.id}.{link}.{attr}", text, [e, target], attr, f"{link}.{attr}", options)
      )
  if options.two_link:
    out.extend(_two_link_questions(rng, ents, options))
  return [q for q in out if q is not None]


def _chain_question(
  qid: str, text: str, chain: List[Entity], attr: str, attribute: str, options: WorldOptions
) -> Optional[Question]:
  """A multi-hop question along `chain` (named entity first, gold last). None in the
  hidden world when the answer document names the person asked about (a sibling's
  document may say "The sibling of Y is X")."""
  named, target = chain[0], chain[-1]
  if options.closed_bridge and set(_words(named.name)) & set(_words(target.text)):
    return None
  clues = _not_in(_name_words(target), text)
  bridge_clues = [w for e in chain[1:-1] for w in _not_in(_name_words(e), text)]
  return Question(
    qid,
    text,
    target.facts[attr],
    "multi",
    attribute,
    target.id,
    named.id,
    clues,
    hops="one_link" if len(chain) == 2 else "two_link",
    chain=[e.id for e in chain],
    bridge_clues=bridge_clues,
  )


def _two_link_questions(
  rng: random.Random, ents: Dict[str, Entity], options: WorldOptions
) -> List[Optional[Question]]:
  """X -> sibling Y -> Y's team / employer / hometown -> an attribute of it ("In which
  city is the team of the sibling of X based?")."""
  out = []
  for e in ents.values():
    if e.kind != "person" or "sibling" not in e.links:
      continue
    sibling = ents[e.links["sibling"]]
    for (link, attr), templates in _ASK_VIA.items():
      if link == "sibling" or link not in sibling.links:
        continue
      target = ents[sibling.links[link]]
      if attr not in target.facts:
        continue
      text = rng.choice(templates).format(n=f"the sibling of {e.name}")
      out.append(
        _chain_question(
          f"{e.id}.sibling.{link}.{attr}",
          text,
          [e, sibling, target],
          attr,
          f"sibling.{link}.{attr}",
          options,
        )
      )
  return out


def _split(rng: random.Random, questions: List[Question], test_share: float) -> None:
  """Marks about `test_share` of the questions as test, keeping at least one training
  question per gold document: a test question is new, its document is not."""
  for q in questions:
    q.split = "test" if rng.random() < test_share else "train"
  has_train = {q.gold for q in questions if q.split == "train"}
  for q in questions:
    if q.split == "test" and q.gold not in has_train:
      q.split = "train"
      has_train.add(q.gold)


def _split_people(
  rng: random.Random,
  questions: List[Question],
  ents: Dict[str, Entity],
  heldout: float,
  test_share: float,
) -> None:
  """Held-out chains: a `heldout` share of the persons is test-only, so every question
  whose chain (single-hop: whose document) touches one of them is test, and unseen; of
  the other questions about `test_share` are test as well."""
  people = [e.id for e in ents.values() if e.kind == "person"]
  rng.shuffle(people)
  held = set(people[: round(heldout * len(people))])
  for q in questions:
    touched = set(q.chain) if q.chain else {q.gold}
    q.split = "test" if touched & held or rng.random() < test_share else "train"


def _mark_seen(questions: List[Question]) -> None:
  """A question is seen when a training question has its (named entity, gold) pair:
  its retriever may then have memorised the mapping instead of reasoning to it."""
  named = lambda q: q.chain[0] if q.chain else q.gold
  train_pairs = {(named(q), q.gold) for q in questions if q.split == "train"}
  for q in questions:
    q.seen = (named(q), q.gold) in train_pairs


def _limit_facts(rng: random.Random, ents: Dict[str, Entity], max_facts: int) -> None:
  """Keeps at most `max_facts` facts per entity (shorter documents); links that multi-hop
  questions use go first."""
  for e in ents.values():
    attrs = sorted(e.facts, key=lambda a: (a not in e.links, rng.random()))
    for attr in attrs[max_facts:]:
      del e.facts[attr]
      e.links.pop(attr, None)


def make_world(
  seed: int,
  size: Union[str, WorldSize] = "tiny",
  test_share: float = 0.2,
  max_facts: Optional[int] = None,
  names: str = "syllables",
  world: Union[str, WorldOptions] = "hidden",
  fresh: bool = False,
) -> World:
  """A world from a seed: `size` is a name in SIZES or a WorldSize; `max_facts` caps the
  facts (sentences) per document; `names`: "syllables" (every world invents its own)
  or "pool" (single-token names from a fixed pool, see `name_pool`); `world`: a name of
  WORLDS or WorldOptions; `fresh`: a world that teaches reading (its pool names come
  from the half the main world never uses, when the options say so)."""
  options = world_options(world)
  shape = SIZES[size] if isinstance(size, str) else size
  if isinstance(size, str) and size not in SIZES:
    raise ValueError(f"unknown world size {size!r}; known: {sorted(SIZES)}")
  rng = random.Random(f"clara-world:{seed}")
  part = ("fresh" if fresh else "main") if options.own_names and names == "pool" else None
  ents = _make_entities(rng, shape, names, part)
  if max_facts is not None:
    _limit_facts(rng, ents, max_facts)
  for e in ents.values():
    e.text = _render(rng, e, None)
    e.paraphrase = _render(rng, e, None)
    for _ in range(4):  # a paraphrase must reword, not repeat
      if e.paraphrase != e.text:
        break
      e.paraphrase = _render(rng, e, None)
  questions = _questions(rng, ents, options)
  if options.heldout_people > 0 and test_share > 0:
    _split_people(rng, questions, ents, options.heldout_people, test_share)
  else:
    _split(rng, questions, test_share)
  _mark_seen(questions)
  return World(seed, ents, questions, names, options)


def _candidates(
  rng: random.Random, world: World, q: Question, n: int
) -> Tuple[List[str], List[int]]:
  """`n` document ids with the gold among them. Hidden world: documents of the gold's
  kind (then others if too few), never a bridge. Classic world: the bridge document (it
  names the question's person), half of the rest of the gold's kind, then any others."""
  bridges = q.chain[:-1] if q.chain else ([q.bridge] if q.bridge else [])
  excluded = {q.gold} | (set(bridges) if world.options.closed_bridge else set())
  others = [e.id for e in world.docs() if e.id not in excluded]
  if n > len(others) + 1:
    raise ValueError(
      f"{n} candidates requested but the world has only {len(others) + 1} "
      f"documents a question may be given; use a larger size"
    )
  gold = world.entities[q.gold]
  same_kind = [i for i in others if world.entities[i].kind == gold.kind]
  rest = [i for i in others if world.entities[i].kind != gold.kind]
  rng.shuffle(same_kind)
  rng.shuffle(rest)
  if world.options.hard_negatives:
    picked = (same_kind + rest)[: n - 1]
  else:
    picked = [] if world.options.closed_bridge else list(dict.fromkeys(bridges))
    for i in same_kind[: max(0, (n - 1) // 2)] + rest + same_kind[(n - 1) // 2 :]:
      if len(picked) >= n - 1:
        break
      if i not in picked:
        picked.append(i)
  ids = picked + [q.gold]
  rng.shuffle(ids)
  return ids, [ids.index(q.gold)]


def _control_clues(
  rng: random.Random, world: World, q: Question, ids: Sequence[str]
) -> List[List[str]]:
  """Per candidate, the words the lens compares with the gold's clues: the candidate's
  entity name words the question does not say, and for a two-link question the name of
  a decoy person off the chain (the gold's side has the sibling's), so both sides hold
  the same kinds of words. The gold's own entry is its clues plus bridge clues."""
  people = [e.id for e in world.docs() if e.kind == "person" and e.id not in q.chain]
  out = []
  for i in ids:
    if i == q.gold:
      out.append(list(q.clues) + list(q.bridge_clues))
      continue
    words = _not_in(_name_words(world.entities[i]), q.text)
    if q.bridge_clues and people:
      words += _not_in(_name_words(world.entities[rng.choice(people)]), q.text)
    out.append(list(dict.fromkeys(words)))
  return out


def stage_rows(
  world: World, split: str, candidates: int = 20, k: int = 5, seed: int = 0
) -> Dict[str, List[Dict]]:
  """{format: rows} of one split. stage2 and stage1_2 rows carry, beside the format's
  fields, what evaluation breaks results down by and what baselines need: `id`, `kind`
  (single / one_link / two_link), `template`, `seen`, `doc_ids`, `doc_kinds`, and the
  lens's `clues`, `bridge_clues` and `control_clues`."""
  qs = [q for q in world.questions if q.split == split]
  rows: Dict[str, List[Dict]] = {STAGE1: [], STAGE1_2: [], STAGE2: []}
  for e in world.docs():
    single = [q for q in qs if q.gold == e.id and q.kind == "single"]
    if single:
      rows[STAGE1].append(
        {
          "data_type": "qa",
          "question": [q.text for q in single],
          "answers": [q.answer for q in single],
          "docs": [e.text],
        }
      )
    if split == "train":
      rows[STAGE1].append(
        {"data_type": "paraphrase", "question": [], "answers": [e.paraphrase], "docs": [e.text]}
      )
  for q in qs:
    rng = random.Random(f"candidates:{world.seed}:{seed}:{q.id}")
    ids, pos = _candidates(rng, world, q, candidates)
    few_ids, few_pos = _candidates(rng, world, q, k)
    for fmt, (cand_ids, cand_pos) in ((STAGE2, (ids, pos)), (STAGE1_2, (few_ids, few_pos))):
      rows[fmt].append(
        {
          "id": q.id,
          "question": q.text,
          "docs": [world.entities[i].text for i in cand_ids],
          "answer": q.answer,
          "answers": [q.answer],
          "pos_index": cand_pos,
          "kind": q.hops,
          "template": q.template,
          "seen": q.seen,
          "doc_ids": list(cand_ids),
          "doc_kinds": [world.entities[i].kind for i in cand_ids],
          "clues": q.clues,
          "bridge_clues": q.bridge_clues,
          "control_clues": _control_clues(rng, world, q, cand_ids),
        }
      )
  for fmt, fmt_rows in rows.items():
    for row in fmt_rows:  # what we write must read back
      validate_row(row, fmt)
  return rows


def world_lm_lines(world: World, wordings: int = 3) -> List[str]:
  """Every document of the world in `wordings` wordings: every fact, links included, as
  knowledge the base can learn (drawing order: the same on every machine)."""
  rng = random.Random(f"lm:{world.seed}")
  lines: List[str] = []
  for e in world.docs():
    # Distinct wordings in drawing order (a set's order would follow the process's
    # string-hash seed, and with it the pretraining text and every later result).
    lines.extend(dict.fromkeys(_render(rng, e, v) for v in range(wordings)))
  return lines


def lm_text(
  world: World,
  wordings: int = 3,
  fresh_worlds: int = 8,
  size: Union[str, WorldSize] = "tiny",
  max_facts: Optional[int] = None,
) -> List[str]:
  """Lines of pretraining text: `world_lm_lines`, then the documents of `fresh_worlds`
  other worlds (language without these facts)."""
  lines = world_lm_lines(world, wordings)
  rng = _after_world_lines(world, wordings)
  for i in range(fresh_worlds):
    other = make_world(
      _fresh_seed(world.seed, i),
      size,
      max_facts=max_facts,
      names=world.names,
      world=world.options,
      fresh=True,
    )
    lines.extend(e.text for e in other.docs())
    # A document of another world followed by a question on it and its answer: the base
    # learns to answer from its context (facts it cannot know), the skill the generator
    # later needs with memories, plus the pieces and shape of the prompt formats.
    for q in rng.sample(other.questions, min(len(other.questions), 150)):
      if q.kind == "single":
        lines.append(
          rng.choice(_QA_LINES).format(d=other.entities[q.gold].text, q=q.text, a=q.answer)
        )
  rng.shuffle(lines)
  return lines


def _after_world_lines(world: World, wordings: int) -> random.Random:
  """The LM-text rng in the state `world_lm_lines` leaves it in."""
  rng = random.Random(f"lm:{world.seed}")
  for e in world.docs():
    for v in range(wordings):
      _render(rng, e, v)
  return rng


def _fresh_seed(seed: int, index: int) -> int:
  return 1_000_003 * (seed + 1) + 7919 * (index + 1)


def iter_fresh_rows(
  seed: int,
  fmt: str = STAGE1,
  size: Union[str, WorldSize] = "tiny",
  k: int = 5,
  start_world: int = 0,
  max_facts: Optional[int] = None,
  names: str = "syllables",
  candidates: Optional[int] = None,
  world: Union[str, WorldOptions] = "hidden",
) -> Iterator[Dict]:
  """Endless rows from fresh worlds (new names and facts each world), in world order:
  nothing learned about one world helps answer the next except reading the document.
  `candidates`: documents per stage2 row (default k); `world`: the main world's
  options (its candidates, and which half of the name pool stays its own)."""
  options = dataclasses.replace(world_options(world), heldout_people=0.0)
  index = start_world
  while True:
    fresh = make_world(
      _fresh_seed(seed, 10_000 + index),
      size,
      test_share=0.0,
      max_facts=max_facts,
      names=names,
      world=options,
      fresh=True,
    )
    chunk = stage_rows(fresh, "train", candidates=candidates or k, k=k, seed=seed)[fmt]
    rng = random.Random(f"fresh-order:{seed}:{index}")
    rng.shuffle(chunk)
    yield from chunk
    index += 1


def write_fresh(
  path: str,
  seed: int,
  num_rows: int,
  fmt: str = STAGE1,
  size: Union[str, WorldSize] = "tiny",
  k: int = 5,
  max_facts: Optional[int] = None,
  names: str = "syllables",
  candidates: Optional[int] = None,
  world: Union[str, WorldOptions] = "hidden",
) -> int:
  """Writes the first `num_rows` streamed fresh-world rows (a training file in which no
  fact repeats across worlds)."""
  stream = iter_fresh_rows(
    seed, fmt, size, k, max_facts=max_facts, names=names, candidates=candidates, world=world
  )
  return write_jsonl_atomic(path, (next(stream) for _ in range(num_rows)))


def write_world(
  directory: str,
  seed: int = 0,
  size: Union[str, WorldSize] = "tiny",
  candidates: int = 20,
  k: int = 5,
  lm_wordings: int = 3,
  lm_fresh_worlds: int = 8,
  fresh_rows: int = 0,
  max_facts: Optional[int] = None,
  names: str = "syllables",
  world: Union[str, WorldOptions] = "hidden",
) -> Dict:
  """Writes a world's files into `directory` (see the module docstring); returns the
  manifest. The manifest is written last, so its presence means the world is complete."""
  check_output_dir(directory)
  the_world = make_world(seed, size, max_facts=max_facts, names=names, world=world)
  paths.makedirs(directory)
  counts = _write_stage_files(directory, the_world, candidates, k, seed)
  counts.update(
    _write_lm_files(directory, the_world, lm_wordings, lm_fresh_worlds, size, max_facts)
  )
  counts["corpus.jsonl"] = write_jsonl_atomic(
    paths.join(directory, "corpus.jsonl", absolute=False),
    ({"id": e.id, "text": e.text} for e in the_world.docs()),
  )
  if fresh_rows:
    for fmt in (STAGE1, STAGE1_2):
      name = f"{fmt}_fresh.jsonl"
      counts[name] = write_fresh(
        paths.join(directory, name, absolute=False),
        seed,
        fresh_rows,
        fmt,
        size,
        k,
        max_facts,
        names,
        world=the_world.options,
      )
  manifest = {
    "seed": seed,
    "size": size if isinstance(size, str) else dataclasses.asdict(size),
    "candidates": candidates,
    "k": k,
    "max_facts": max_facts,
    "names": names,
    "world": dataclasses.asdict(the_world.options),
    "files": counts,
    "documents": {e.id: {"kind": e.kind, "name": e.name} for e in the_world.docs()},
    "questions": {q.id: _question_record(q) for q in the_world.questions},
  }
  paths.write_atomic(
    paths.join(directory, "manifest.json", absolute=False), [json.dumps(manifest, indent=1)]
  )
  return manifest


def _write_stage_files(
  directory: str, the_world: World, candidates: int, k: int, seed: int
) -> Dict:
  """Each stage format's train and test rows; {file name: rows}."""
  counts = {}
  for split in ("train", "test"):
    for fmt, rows in stage_rows(the_world, split, candidates, k, seed).items():
      name = f"{fmt}_{split}.jsonl"
      counts[name] = write_jsonl_atomic(paths.join(directory, name, absolute=False), rows)
  return counts


def _write_lm_files(
  directory: str,
  the_world: World,
  wordings: int,
  fresh_worlds: int,
  size: Union[str, WorldSize],
  max_facts: Optional[int],
) -> Dict[str, int]:
  """The pretraining text (lm.txt) and the world's own sentences; {file name: lines}."""
  lines = lm_text(the_world, wordings, fresh_worlds, size, max_facts)
  write_text(paths.join(directory, "lm.txt", absolute=False), lines)
  world_lines = world_lm_lines(the_world, wordings)
  write_text(paths.join(directory, LM_WORLD_FILE, absolute=False), world_lines)
  return {"lm.txt": len(lines), LM_WORLD_FILE: len(world_lines)}


def _question_record(q: Question) -> Dict:
  """A question as the manifest records it."""
  return {
    "question": q.text,
    "answer": q.answer,
    "kind": q.kind,
    "hops": q.hops,
    "attribute": q.attribute,
    "template": q.template,
    "gold": q.gold,
    "bridge": q.bridge,
    "chain": q.chain,
    "clues": q.clues,
    "bridge_clues": q.bridge_clues,
    "split": q.split,
    "seen": q.seen,
  }


def write_text(path: str, lines: Sequence[str]) -> None:
  """Lines of text, one per line, written all or nothing (`paths.write_atomic`)."""
  paths.write_atomic(path, ["\n".join(lines) + "\n"])


def clues_for(manifest_path: str, questions: Sequence[str]) -> List[List[str]]:
  """Clue words per question text (empty for questions the manifest does not know)."""
  try:
    manifest = paths.read_json(manifest_path)
    by_text = {q["question"]: q["clues"] for q in manifest["questions"].values()}
  except (ValueError, KeyError, TypeError, AttributeError) as e:  # not JSON, wrong shape
    raise ValueError(
      f"{manifest_path}: not the manifest.json of a generated world ({type(e).__name__}: {e})"
    ) from None
  return [by_text.get(q, []) for q in questions]


def shuffled_answers(rows: Sequence[Dict], seed: int = 0) -> List[Dict]:
  """The rows with every answer taken from another row of the same `template`: the
  answer loss still flows through the retriever, but no longer says which document
  answers which question (the ablation of stage2's signal). Within each template the
  rows are permuted with no fixed point (a random cycle); a template with one row
  cannot be paired, so its row is dropped."""
  by_template: Dict[str, List[int]] = {}
  for i, row in enumerate(rows):
    if not isinstance(row.get("template"), str):
      raise ValueError(
        f"row {i} ({row.get('id', 'no id')}): shuffled answers need each row's 'template'"
      )
    by_template.setdefault(row["template"], []).append(i)
  rng = random.Random(f"shuffled-answers:{seed}")
  out: Dict[int, Dict] = {}
  for members in by_template.values():
    if len(members) < 2:
      continue
    cycle = rng.sample(members, len(members))
    for a, b in zip(cycle, cycle[1:] + cycle[:1]):  # a takes b's answer: never its own row
      out[a] = dict(
        rows[a],
        answer=rows[b]["answer"],
        answers=list(rows[b]["answers"]),
        answer_from=rows[b].get("id"),
      )
  return [out[i] for i in sorted(out)]


def write_shuffled_answers(source: str, path: str, seed: int = 0) -> int:
  """`shuffled_answers` of a JSONL file's rows, written atomically to `path`."""
  from clara_jax.data.formats import iter_json_lines

  rows = [value for _, value in iter_json_lines(source)]
  return write_jsonl_atomic(path, shuffled_answers(rows, seed))
