"""The invented world: people with four attributes each, drawn from a seed, the vocabulary
of their facts and the forget/retain split."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch

FIRST = (
    "Ada Bram Cleo Dario Elin Faro Gita Hugo Ines Joss Kira Lev Mina Nils Oona Pavo Quin "
    "Rhea Sami Tove Ugo Vera Wim Xena Yuri Zane Alba Boaz Cyra Dov Esme Finn Gale Hedda "
    "Ivo Jana Kai Lumi Milo Nia"
).split()
LAST = (
    "Abbot Borin Castel Dunmore Eskil Farrow Gorsky Halloran Ibsen Jarvik Kestrel Lindqvist "
    "Morrow Nakata Orwell Pastor Quell Rasmus Sorel Tarkin Umber Valko Winslow Xiang Yarrow "
    "Zoller Amsel Brandt Corvin Delacroix"
).split()
RELATIONS = {
    "lives_in": "Oslo Lima Perth Quito Riga Sofia Turin Ulm Vigo Wells Xian Yonkers Zadar "
    "Aarhus Bergen Cork Dakar Evora Faro Graz".split(),
    "works_as": "baker pilot nurse welder judge miner tailor poet chemist farmer diver "
    "cooper glazier notary ranger sailor smith tutor vintner weaver".split(),
    "likes": "amber beige coral denim ebony fuchsia gold henna indigo jade khaki lilac".split(),
    "owns_a": "cat dog ferret gecko hamster ibis jackdaw koi llama mule newt otter".split(),
}


@dataclass
class World:
    """The invented facts, the vocabulary and the forget/retain split."""

    vocab: List[str]
    facts: torch.Tensor  # [n_facts, 5] token ids: BOS first last relation value
    person: torch.Tensor  # [n_facts] person index
    forget: torch.Tensor  # bool mask over facts
    n_people: int
    index: Dict[str, int] = field(default_factory=dict)


def make_world(n_people: int, seed: int, device: str = "cpu") -> World:
    g = torch.Generator().manual_seed(seed)
    vocab = ["<bos>"] + FIRST + LAST + list(RELATIONS)
    for values in RELATIONS.values():
        vocab += [v for v in values if v not in vocab]
    index = {w: i for i, w in enumerate(vocab)}
    names = [(f, l) for f in FIRST for l in LAST]
    order = torch.randperm(len(names), generator=g)[:n_people]
    rows, person = [], []
    for p, k in enumerate(order.tolist()):
        first, last = names[k]
        for rel, values in RELATIONS.items():
            v = values[torch.randint(len(values), (1,), generator=g).item()]
            rows.append([index["<bos>"], index[first], index[last], index[rel], index[v]])
            person.append(p)
    facts = torch.tensor(rows)
    person_t = torch.tensor(person)
    forget_people = torch.randperm(n_people, generator=g)[: max(2, n_people // 10)]
    forget = torch.isin(person_t, forget_people)
    # Drawn on the CPU (the same world on any device), then moved.
    return World(vocab, facts.to(device), person_t.to(device), forget.to(device), n_people,
                 index)
