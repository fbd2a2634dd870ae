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
import os
import random
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from clara_jax.data.formats import STAGE1, STAGE1_2, STAGE2, validate_row, write_jsonl_atomic

_ONSETS = ("b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st",
           "t", "th", "v", "z", "h", "j", "sh", "tr", "gr", "c", "w")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ia", "ou", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m", "x", "nd", "rk", "sk", "v")
_MASCOTS = ("Owls", "Foxes", "Herons", "Wolves", "Otters", "Ravens", "Hawks", "Lynxes",
            "Badgers", "Falcons", "Stags", "Comets", "Pilots", "Rangers", "Mariners",
            "Giants", "Rockets", "Wardens", "Lanterns", "Anchors")
_FIRMS = ("Works", "Labs", "Foods", "Motors", "Textiles", "Press", "Systems", "Mills",
          "Instruments", "Shipping")
_PRODUCTS = ("bicycles", "lamps", "maps", "soap", "kites", "clocks", "tea", "boots",
             "radios", "paper", "glass", "rope", "cheese", "pianos", "tents", "ink",
             "bricks", "violins", "sails", "honey")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black",
            "silver", "gold", "grey", "brown")
_SPORTS = ("football", "hockey", "rugby", "basketball", "handball", "cricket")
YEARS = (1820, 2010)

STAGE1_NAME, STAGE1_2_NAME, STAGE2_NAME = STAGE1, STAGE1_2, STAGE2


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
  multi-hop questions, the document of the entity the question names; `clues`: words of
  the gold document's entity name that the question does not contain."""
  id: str
  text: str
  answer: str
  kind: str  # "single" | "multi"
  attribute: str
  gold: str
  bridge: Optional[str]
  clues: List[str]
  split: str = "train"


@dataclasses.dataclass
class World:
  seed: int
  entities: Dict[str, Entity]
  questions: List[Question]
  names: str = "syllables"

  def docs(self) -> List[Entity]:
    return list(self.entities.values())


class _Names:
  """Unique pronounceable fictional names from syllables: every world its own names."""

  def __init__(self, rng: random.Random):
    self.rng, self.used = rng, set()

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
# pieces (which a small model learns far too slowly; docs/demo_log.md).
_POOL_SIZES = {"first": 64, "last": 64, "place": 72, "brand": 72}


@functools.lru_cache(maxsize=1)
def name_pool() -> Dict[str, Tuple[str, ...]]:
  """{category: words} of the fixed pool (the same on every machine and call)."""
  names = _Names(random.Random("clara-name-pool"))
  return {category: tuple(names.word((1, 2) if category == "first" else (2, 2))
                          for _ in range(n)) for category, n in _POOL_SIZES.items()}


def pool_symbols() -> List[str]:
  """The pool's words as SentencePiece user symbols ("\u2581" marks the preceding
  space, so a name after a space is one piece)."""
  return ["\u2581" + w for words in name_pool().values() for w in words]


class _PoolNames:
  """Names drawn without replacement from the fixed pool (see `name_pool`)."""

  def __init__(self, rng: random.Random):
    self.rng = rng
    pool = name_pool()
    self.free = {c: self.rng.sample(words, len(words)) for c, words in pool.items()}
    self.people = set()

  def _take(self, category: str) -> str:
    if not self.free[category]:
      raise RuntimeError(f"the name pool has only {_POOL_SIZES[category]} {category} "
                         "names; use a smaller world")
    return self.free[category].pop()

  def city(self) -> str:
    return self._take("place")

  def river(self) -> str:
    return self._take("place")

  def brand(self) -> str:
    return self._take("brand")

  def person(self) -> str:
    for _ in range(1000):
      pool = name_pool()
      name = f"{self.rng.choice(pool['first'])} {self.rng.choice(pool['last'])}"
      if name not in self.people:
        self.people.add(name)
        return name
    raise RuntimeError("the name pool has too few people; use a smaller world")


_NAMERS = {"syllables": _Names, "pool": _PoolNames}


def _year(rng: random.Random) -> str:
  return str(rng.randint(*YEARS))


def _make_entities(rng: random.Random, size: WorldSize, names: str) -> Dict[str, Entity]:
  if names not in _NAMERS:
    raise ValueError(f"unknown names {names!r}; known: {sorted(_NAMERS)}")
  names = _NAMERS[names](rng)
  ents: Dict[str, Entity] = {}
  cities = []
  for i in range(size.cities):
    e = Entity(f"city{i}", "city", names.city(), {
        "river": names.river(), "population": f"{rng.randint(12, 950)} thousand"}, {})
    ents[e.id] = e
    cities.append(e)
  teams = []
  mascots = rng.sample(_MASCOTS, min(len(_MASCOTS), size.teams))
  for i in range(size.teams):
    city = rng.choice(cities)
    mascot = mascots[i % len(mascots)]
    e = Entity(f"team{i}", "team", f"{names.brand()} {mascot}", {
        "city": city.name, "founded": _year(rng), "colour": rng.choice(_COLOURS),
        "sport": rng.choice(_SPORTS)}, {"city": city.id})
    ents[e.id] = e
    teams.append(e)
  companies = []
  for i in range(size.companies):
    city = rng.choice(cities)
    e = Entity(f"company{i}", "company", f"{names.brand()} {rng.choice(_FIRMS)}", {
        "city": city.name, "founded": _year(rng), "product": rng.choice(_PRODUCTS)},
        {"city": city.id})
    ents[e.id] = e
    companies.append(e)
  people = []
  for i in range(size.people):
    city = rng.choice(cities)
    facts = {"born": _year(rng), "birthplace": city.name}
    links = {"birthplace": city.id}
    if i % 2 == 0:
      team = rng.choice(teams)
      facts["team"], links["team"] = team.name, team.id
    else:
      company = rng.choice(companies)
      facts["employer"], links["employer"] = company.name, company.id
    e = Entity(f"person{i}", "person", names.person(), facts,
               links)
    ents[e.id] = e
    people.append(e)
  order = list(range(len(people)))
  rng.shuffle(order)
  for a, b in zip(order[0::2], order[1::2]):  # sibling pairs
    pa, pb = people[a], people[b]
    pa.facts["sibling"], pa.links["sibling"] = pb.name, pb.id
    pb.facts["sibling"], pb.links["sibling"] = pa.name, pa.id
  return ents


# Sentences per attribute, several wordings each: {n} the entity's name, {v} the value.
_SENTENCES = {
    ("person", "born"): ("{n} was born in {v}.", "{n} is a person born in the year {v}.",
                         "The birth year of {n} is {v}."),
    ("person", "birthplace"): ("{n} comes from {v}.", "{n} was born in the city of {v}.",
                               "The hometown of {n} is {v}."),
    ("person", "team"): ("{n} plays for the {v}.", "{n} is a player of the {v}.",
                         "The team of {n} is the {v}."),
    ("person", "employer"): ("{n} works for {v}.", "{n} is employed by {v}.",
                             "The employer of {n} is {v}."),
    ("person", "sibling"): ("The sibling of {n} is {v}.", "{n} has a sibling named {v}.",
                            "{v} is the sibling of {n}."),
    ("city", "river"): ("{n} lies on the {v} river.", "The {v} river flows through {n}.",
                        "The river of {n} is the {v}."),
    ("city", "population"): ("{n} has {v} residents.", "About {v} people live in {n}.",
                             "The population of {n} is {v}."),
    ("team", "city"): ("The {n} are based in {v}.", "The {n} play their games in {v}.",
                       "The home city of the {n} is {v}."),
    ("team", "founded"): ("The {n} were founded in {v}.", "The {n} club dates from {v}.",
                          "The {n} first played in {v}."),
    ("team", "colour"): ("The {n} wear {v}.", "The colour of the {n} is {v}.",
                         "The {n} play in {v} shirts."),
    ("team", "sport"): ("The {n} are a {v} team.", "The {n} play {v}.",
                        "The sport of the {n} is {v}."),
    ("company", "city"): ("{n} is headquartered in {v}.", "{n} has its head office in {v}.",
                          "The headquarters of {n} are in {v}."),
    ("company", "founded"): ("{n} was founded in {v}.", "{n} opened in {v}.",
                             "{n} started business in {v}."),
    ("company", "product"): ("{n} makes {v}.", "{n} produces {v}.",
                             "The main product of {n} is {v}."),
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
_QA_LINES = ("{d} Question: {q} Answer: {a}", "[INST] Background: {d} Question:{q} [/INST] {a}",
             "[INST] Background: {d} means the same as [/INST] Question: {q} Answer: {a}")


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


def _questions(rng: random.Random, ents: Dict[str, Entity]) -> List[Question]:
  out: List[Question] = []
  for e in ents.values():
    for attr, value in e.facts.items():
      template = rng.choice(_ASK[(e.kind, attr)])
      out.append(Question(f"{e.id}.{attr}", template.format(n=e.name), value, "single",
                          attr, e.id, None, []))
    if e.kind != "person":
      continue
    for (link, attr), templates in _ASK_VIA.items():
      if link not in e.links:
        continue
      target = ents[e.links[link]]
      if attr not in target.facts:
        continue
      text = rng.choice(templates).format(n=e.name)
      question_words = set(_words(text))
      clues = [w for w in dict.fromkeys(_words(target.name)) if w not in question_words]
      out.append(Question(f"{e.id}.{link}.{attr}", text, target.facts[attr], "multi",
                          f"{link}.{attr}", target.id, e.id, clues))
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


def _limit_facts(rng: random.Random, ents: Dict[str, Entity], max_facts: int) -> None:
  """Keeps at most `max_facts` facts per entity (shorter documents); links that multi-hop
  questions use go first."""
  for e in ents.values():
    attrs = sorted(e.facts, key=lambda a: (a not in e.links, rng.random()))
    for attr in attrs[max_facts:]:
      del e.facts[attr]
      e.links.pop(attr, None)


def make_world(seed: int, size="tiny", test_share: float = 0.2,
               max_facts: Optional[int] = None, names: str = "syllables") -> World:
  """A world from a seed: `size` is a name in SIZES or a WorldSize; `max_facts` caps the
  facts (sentences) per document; `names`: "syllables" (every world invents its own)
  or "pool" (single-token names from a fixed pool, see `name_pool`)."""
  shape = SIZES[size] if isinstance(size, str) else size
  if isinstance(size, str) and size not in SIZES:
    raise ValueError(f"unknown world size {size!r}; known: {sorted(SIZES)}")
  rng = random.Random(f"clara-world:{seed}")
  ents = _make_entities(rng, shape, names)
  if max_facts is not None:
    _limit_facts(rng, ents, max_facts)
  for e in ents.values():
    e.text = _render(rng, e, None)
    e.paraphrase = _render(rng, e, None)
    for _ in range(4):  # a paraphrase must reword, not repeat
      if e.paraphrase != e.text:
        break
      e.paraphrase = _render(rng, e, None)
  questions = _questions(rng, ents)
  _split(rng, questions, test_share)
  return World(seed, ents, questions, names)


def _candidates(rng: random.Random, world: World, q: Question, n: int) -> Tuple[List[str], List[int]]:
  """`n` document ids with the gold among them: the bridge document (it names the
  question's person), documents of the gold's kind (hard), then any others."""
  if n > len(world.entities):
    raise ValueError(f"{n} candidates requested but the world has {len(world.entities)} "
                     "documents; use a larger size")
  gold = world.entities[q.gold]
  others = [e.id for e in world.docs() if e.id != q.gold]
  same_kind = [i for i in others if world.entities[i].kind == gold.kind]
  rest = [i for i in others if world.entities[i].kind != gold.kind]
  rng.shuffle(same_kind)
  rng.shuffle(rest)
  picked = [q.bridge] if q.bridge else []
  for i in same_kind[: max(0, (n - 1) // 2)] + rest + same_kind[(n - 1) // 2:]:
    if len(picked) >= n - 1:
      break
    if i not in picked:
      picked.append(i)
  ids = picked + [q.gold]
  rng.shuffle(ids)
  return ids, [ids.index(q.gold)]


def stage_rows(world: World, split: str, candidates: int = 20, k: int = 5,
               seed: int = 0) -> Dict[str, List[Dict]]:
  """{format: rows} of one split."""
  qs = [q for q in world.questions if q.split == split]
  rows: Dict[str, List[Dict]] = {STAGE1: [], STAGE1_2: [], STAGE2: []}
  for e in world.docs():
    single = [q for q in qs if q.gold == e.id and q.kind == "single"]
    if single:
      rows[STAGE1].append({"data_type": "qa", "question": [q.text for q in single],
                           "answers": [q.answer for q in single], "docs": [e.text]})
    if split == "train":
      rows[STAGE1].append({"data_type": "paraphrase", "question": [],
                           "answers": [e.paraphrase], "docs": [e.text]})
  for q in qs:
    rng = random.Random(f"candidates:{world.seed}:{seed}:{q.id}")
    ids, pos = _candidates(rng, world, q, candidates)
    docs = [world.entities[i].text for i in ids]
    rows[STAGE2].append({"id": q.id, "question": q.text, "docs": docs, "answer": q.answer,
                         "answers": [q.answer], "pos_index": pos, "kind": q.kind})
    few_ids, few_pos = _candidates(rng, world, q, k)
    rows[STAGE1_2].append({"id": q.id, "question": q.text,
                           "docs": [world.entities[i].text for i in few_ids],
                           "answer": q.answer, "answers": [q.answer], "pos_index": few_pos,
                           "kind": q.kind})
  for fmt, fmt_rows in rows.items():
    for row in fmt_rows:  # what we write must read back
      validate_row(row, fmt)
  return rows


def lm_text(world: World, wordings: int = 3, fresh_worlds: int = 8,
            size="tiny", max_facts: Optional[int] = None) -> List[str]:
  """Lines of pretraining text: every document of the world in `wordings` wordings, then
  the documents of `fresh_worlds` other worlds (language without these facts)."""
  rng = random.Random(f"lm:{world.seed}")
  lines = []
  for e in world.docs():
    # Distinct wordings in drawing order (a set's order would follow the process's
    # string-hash seed, and with it the pretraining text and every later result).
    lines.extend(dict.fromkeys(_render(rng, e, v) for v in range(wordings)))
  for i in range(fresh_worlds):
    other = make_world(_fresh_seed(world.seed, i), size, max_facts=max_facts,
                       names=world.names)
    lines.extend(e.text for e in other.docs())
    # A document of another world followed by a question on it and its answer: the base
    # learns to answer from its context (facts it cannot know), the skill the generator
    # later needs with memories, plus the pieces and shape of the prompt formats.
    for q in rng.sample(other.questions, min(len(other.questions), 150)):
      if q.kind == "single":
        lines.append(rng.choice(_QA_LINES).format(d=other.entities[q.gold].text, q=q.text,
                                                  a=q.answer))
  rng.shuffle(lines)
  return lines


def _fresh_seed(seed: int, index: int) -> int:
  return 1_000_003 * (seed + 1) + 7919 * (index + 1)


def iter_fresh_rows(seed: int, fmt: str = STAGE1, size="tiny", k: int = 5,
                    start_world: int = 0, max_facts: Optional[int] = None,
                    names: str = "syllables", candidates: Optional[int] = None
                    ) -> Iterator[Dict]:
  """Endless rows from fresh worlds (new names and facts each world), in world order:
  nothing learned about one world helps answer the next except reading the document.
  `candidates`: documents per stage2 row (default k)."""
  index = start_world
  while True:
    world = make_world(_fresh_seed(seed, 10_000 + index), size, test_share=0.0,
                       max_facts=max_facts, names=names)
    rows = stage_rows(world, "train", candidates=candidates or k, k=k, seed=seed)
    chunk = rows[fmt] if fmt != STAGE2 else rows[STAGE2]
    rng = random.Random(f"fresh-order:{seed}:{index}")
    rng.shuffle(chunk)
    yield from chunk
    index += 1


def write_fresh(path: str, seed: int, num_rows: int, fmt: str = STAGE1, size="tiny",
                k: int = 5, max_facts: Optional[int] = None, names: str = "syllables",
                candidates: Optional[int] = None) -> int:
  """Writes the first `num_rows` streamed fresh-world rows (a training file in which no
  fact repeats across worlds)."""
  stream = iter_fresh_rows(seed, fmt, size, k, max_facts=max_facts, names=names,
                           candidates=candidates)
  return write_jsonl_atomic(path, (next(stream) for _ in range(num_rows)))


def write_world(directory: str, seed: int = 0, size="tiny", candidates: int = 20,
                k: int = 5, lm_wordings: int = 3, lm_fresh_worlds: int = 8,
                fresh_rows: int = 0, max_facts: Optional[int] = None,
                names: str = "syllables") -> Dict:
  """Writes a world's files into `directory` (see the module docstring); returns the
  manifest. The manifest is written last, so its presence means the world is complete."""
  world = make_world(seed, size, max_facts=max_facts, names=names)
  os.makedirs(directory, exist_ok=True)
  counts = {}
  for split in ("train", "test"):
    for fmt, rows in stage_rows(world, split, candidates, k, seed).items():
      name = f"{fmt}_{split}.jsonl"
      counts[name] = write_jsonl_atomic(os.path.join(directory, name), rows)
  lines = lm_text(world, lm_wordings, lm_fresh_worlds, size, max_facts)
  _write_text(os.path.join(directory, "lm.txt"), lines)
  counts["lm.txt"] = len(lines)
  counts["corpus.jsonl"] = write_jsonl_atomic(
      os.path.join(directory, "corpus.jsonl"),
      ({"id": e.id, "text": e.text} for e in world.docs()))
  if fresh_rows:
    for fmt in (STAGE1, STAGE1_2):
      name = f"{fmt}_fresh.jsonl"
      counts[name] = write_fresh(os.path.join(directory, name), seed, fresh_rows, fmt, size,
                                 k, max_facts, names)
  manifest = {
      "seed": seed, "size": size if isinstance(size, str) else dataclasses.asdict(size),
      "candidates": candidates, "k": k, "max_facts": max_facts, "names": names,
      "files": counts,
      "documents": {e.id: {"kind": e.kind, "name": e.name} for e in world.docs()},
      "questions": {q.id: {"question": q.text, "answer": q.answer, "kind": q.kind,
                           "attribute": q.attribute, "gold": q.gold, "bridge": q.bridge,
                           "clues": q.clues, "split": q.split} for q in world.questions},
  }
  tmp = os.path.join(directory, ".manifest.json.tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(directory, "manifest.json"))
  return manifest


def _write_text(path: str, lines: Sequence[str]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(tmp, path)


def clues_for(manifest_path: str, questions: Sequence[str]) -> List[List[str]]:
  """Clue words per question text (empty for questions the manifest does not know)."""
  with open(manifest_path) as f:
    manifest = json.load(f)
  by_text = {q["question"]: q["clues"] for q in manifest["questions"].values()}
  return [by_text.get(q, []) for q in questions]
