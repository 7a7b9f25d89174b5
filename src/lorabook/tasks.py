"""The two generated tasks on one base model: loan-servicing messages -> a JSON record (chapter 1).

Every message comes from seeded code: a core template per intent (with paraphrase choices written
``[a|b]``), a random greeting, account reference, distractor sentence (phone numbers, dates, card
digits: numbers that are neither the amount nor the account), urgency cue and sign-off, then typos
and casing. A quarter of the core templates and urgency cues are held out: they appear only in
the test split, so a model cannot score by remembering phrasings. For choosing hyper-parameters
without looking at the test split, ``validation=True`` splits the *training* templates again the
same way: a model is fitted on two thirds of them ("fit") and scored on the other third ("val"),
unseen templates as in the test, and the test templates are never touched.

- ``loan_intent``: {"intent": one of INTENTS, "amount": "250.00" or null, "account": "LN-48213" or null}
- ``triage``: {"team": one of TEAMS, "urgency": "low" | "medium" | "high"}

The same seed gives the same messages to both tasks, so one message can be read by two adapters.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from lorabook import task_templates as phrases

INTENTS = tuple(phrases.INTENT_TEMPLATES)
TEAMS = ("payments", "accounts", "financial_support", "complaints")
URGENCIES = ("low", "medium", "high")
TEAM_OF_INTENT = {
    "change_payment_date": "payments", "payment_failed": "payments",
    "refund_overpayment": "payments", "cancel_direct_debit": "payments",
    "early_settlement": "accounts", "balance_enquiry": "accounts",
    "statement_request": "accounts", "update_contact_details": "accounts",
    "hardship": "financial_support", "complaint": "complaints",
}
TASK_KEYS = {"loan_intent": ("intent", "amount", "account"), "triage": ("team", "urgency")}
SYSTEM_PROMPTS = {  # short on purpose: the format is what fine-tuning teaches
    "loan_intent": "Reply in JSON with intent, amount and account.",
    "triage": "Reply in JSON with team and urgency.",
}
HELD_OUT_EVERY = 4  # template i is a test template when i % 4 == 3: 25% held out
MAX_CHARS = 150  # greeting, sign-off, distractor are dropped to keep a message under this


def canonical_json(record: dict, task: str) -> str:
    """The one string form of a record: the task's keys in fixed order, compact (chapter 1)."""
    if task not in TASK_KEYS:
        raise ValueError(f"unknown task {task!r}; expected one of {tuple(TASK_KEYS)}")
    keys = TASK_KEYS[task]
    if set(record) != set(keys):
        raise ValueError(f"a {task} record has keys {keys}, got {tuple(record)}")
    return json.dumps({k: record[k] for k in keys}, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Example:
    """One generated example: the message, its canonical JSON target and the record (chapter 1)."""

    task: str  # "loan_intent" or "triage": picks the system prompt
    message: str  # the customer's message, the user turn
    target: str  # canonical JSON string the model must write
    record: dict = field(default=None, compare=False, repr=False)  # json.loads(target)
    template_id: str = ""  # "intent/index" of the core template, e.g. "hardship/03"

    def __post_init__(self):
        if self.record is None:
            object.__setattr__(self, "record", json.loads(self.target))


# ---------------------------------------------------------------- slot values, many surface forms


def _pick(rng: random.Random, text: str) -> str:
    """Resolve every paraphrase choice ``[a|b|c]`` (an empty alternative allowed)."""
    return re.sub(r"\[([^\[\]]*)\]", lambda m: rng.choice(m.group(1).split("|")), text)


def _ordinal(d: int) -> str:
    suffix = "th" if 11 <= d % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


def _date(rng: random.Random) -> str:
    d, m, y = rng.randint(1, 28), rng.randint(1, 12), rng.randint(2023, 2026)
    month = _MONTHS[m - 1]
    return rng.choice([f"{d:02d}/{m:02d}", f"{d:02d}/{m:02d}/{y}", f"{d} {month}",
                       f"{month} {_ordinal(d)}", f"the {_ordinal(d)} of {month}",
                       f"{_ordinal(d)} {month[:3]}", f"{d}.{m}.{y % 100}"])


def _amount(rng: random.Random) -> tuple[str, str]:
    """(surface form, canonical "pounds.pence") for one sum of money in GBP."""
    pounds = rng.choice([rng.randint(1, 60) * 5, rng.randint(20, 999), rng.randint(1000, 9999)])
    pence = 0 if rng.random() < 0.6 else rng.randint(1, 99)
    canonical = f"{pounds}.{pence:02d}"
    if pence == 0 and pounds in phrases.AMOUNT_WORDS and rng.random() < 0.5:
        return rng.choice(phrases.AMOUNT_WORDS[pounds]), canonical
    num = rng.choice([f"{pounds}", f"{pounds:,}"]) + (f".{pence:02d}" if pence else "")
    forms = [f"£{num}", f"£{num}", f"£ {num}", f"{num} GBP", f"GBP {num}", f"{num}gbp",
             f"£{pounds:,}.{pence:02d}", f"{pounds}.{pence:02d} pounds"]
    if pence == 0:
        forms += [f"{num} pounds", f"{num} quid", f"£{num}.00"]
    return rng.choice(forms), canonical


def _slots(rng: random.Random, amount: str, account: str) -> dict:
    """Values for every placeholder a template may use; amount/account are already rendered."""
    first, last = rng.choice(phrases.FIRST_NAMES), rng.choice(phrases.SURNAMES)
    day, day2 = rng.sample(range(1, 29), 2)
    phone = "07" + "".join(rng.choice("0123456789") for _ in range(9))
    return {
        "amount": amount, "account": account, "day": _ordinal(day), "day2": _ordinal(day2),
        "date": _date(rng), "year": str(rng.randint(2018, 2025)),
        "n": rng.choice(["2", "3", "4", "6", "two", "three", "six"]),
        "hour": str(rng.randint(1, 9)), "card": f"{rng.randint(0, 9999):04d}",
        "phone": rng.choice([phone, f"{phone[:5]} {phone[5:]}", f"+44 {phone[1:5]} {phone[5:]}"]),
        "email": f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.com",
        "postcode": f"{rng.choice(['M', 'LS', 'BS', 'NE', 'CF', 'EH', 'B'])}{rng.randint(1, 20)} "
                    f"{rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
                    f"{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}",
        "street": f"{rng.randint(1, 240)} {rng.choice(phrases.STREETS)}",
        "sortcode": f"{rng.randint(10, 99)}-{rng.randint(10, 99)}-{rng.randint(10, 99)}",
        "name": first, "surname": rng.choice(phrases.SURNAMES), "full": f"{first} {last}",
    }


def _typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(1, len(word) - 1)
    op = rng.randrange(3)
    if op == 0:  # swap two neighbours
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:  # drop a letter
        return word[:i] + word[i + 1:]
    return word[:i] + word[i] + word[i:]  # double a letter


def _add_typos(rng: random.Random, text: str, k: int) -> str:
    """Put ``k`` typos into plain words (4+ letters), never inside a ``{placeholder}``."""
    spans = [m.span() for m in re.finditer(r"(?<![{\w])[A-Za-z]{4,}(?![}\w])", text)]
    for start, end in sorted(rng.sample(spans, min(k, len(spans))), reverse=True):
        text = text[:start] + _typo(rng, text[start:end]) + text[end:]
    return text


# ---------------------------------------------------------------- one message


SPLITS = ("train", "test", "fit", "val")  # fit + val = train: the validation split of train


def _in_split(items, split: str):
    """The (index, item) pairs of a list that belong to ``split``, by index % HELD_OUT_EVERY.

    test: 3; train: 0, 1, 2; and inside train, for choosing hyper-parameters: val: 2, fit: 0, 1.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    keep = {"test": (3,), "train": (0, 1, 2), "val": (2,), "fit": (0, 1)}[split]
    return [(i, x) for i, x in enumerate(items) if i % HELD_OUT_EVERY in keep]


def _message(rng: random.Random, intent: str, split: str) -> dict:
    """Sample one message of ``intent`` from the templates of ``split``: text plus its facts."""
    idx, core = rng.choice(_in_split(phrases.INTENT_TEMPLATES[intent], split))
    parts = [_pick(rng, core)]  # the skeleton, sentence by sentence, slots still {open}
    has_amount = "{amount}" in core
    if not has_amount and rng.random() < 0.2:  # one sum of money, said in passing
        has_amount = True
        parts.insert(rng.randint(0, 1), _pick(rng, rng.choice(phrases.AMOUNT_WRAPPERS)))
    has_account = "{account}" in core or rng.random() < 0.55
    if has_account and "{account}" not in core:
        wrapper = _pick(rng, rng.choice(phrases.ACCOUNT_WRAPPERS))
        parts.insert(0 if rng.random() < 0.5 else len(parts), wrapper)
    urgency = rng.choice(URGENCIES)
    if urgency != "medium":
        cue = rng.choice(_in_split(phrases.URGENCY_CUES[urgency], split))[1]
        parts.insert(0 if rng.random() < 0.3 else len(parts), cue)
    # Parts that carry no label, dropped in this order while the message is over MAX_CHARS.
    extras = {}
    if rng.random() < 0.35:
        extras["distractor"] = rng.randint(0, len(parts)), _pick(rng, rng.choice(phrases.DISTRACTORS))
    if rng.random() < 0.6:
        extras["greeting"] = 0, rng.choice(phrases.GREETINGS)
    if rng.random() < 0.5:
        extras["sign_off"] = len(parts) + 1, _pick(rng, rng.choice(phrases.SIGN_OFFS))
    amount_text, amount = _amount(rng) if has_amount else ("", None)
    digits = f"{rng.randint(10000, 99999)}"
    account = f"LN-{digits}" if has_account else None
    slots = _slots(rng, amount_text, rng.choice(phrases.ACCOUNT_FORMS).format(d=digits))

    def assemble(names):
        out = list(parts)
        for pos, extra in sorted((extras[k] for k in names), key=lambda e: -e[0]):
            out.insert(pos, extra)
        return " ".join(out)

    kept = [k for k in ("distractor", "greeting", "sign_off") if k in extras]
    while kept and len(assemble(kept).format(**slots)) > MAX_CHARS:
        kept.pop(0)
    text = assemble(kept)
    if rng.random() < 0.3:
        text = _add_typos(rng, text, rng.randint(1, 2))
    text = text.format(**slots)
    casing = rng.random()
    if casing < 0.12:
        text = text.lower()
    elif casing < 0.15 and len(text) <= 100:  # shouting costs ~2x the tokens: short ones only
        text = text.upper()
    if rng.random() < 0.15:
        text = text.rstrip(".!?")
    return {"message": text, "intent": intent, "amount": amount, "account": account,
            "urgency": urgency, "template_id": f"{intent}/{idx:02d}"}


def _messages(n: int, seed: int, split: str) -> list[dict]:
    """``n`` messages with every intent equally often (round-robin), in seeded random order."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of examples must be an int >= 0, got {n!r}")
    rng = random.Random(f"lorabook-{seed}-{split}")
    intents = [INTENTS[i % len(INTENTS)] for i in range(n)]
    rng.shuffle(intents)
    return [_message(rng, intent, split) for intent in intents]


def _examples(task: str, n_train: int, n_test: int, seed: int, to_record,
              validation: bool = False) -> dict:
    out = {}
    splits = ("fit", "val") if validation else ("train", "test")
    for split, source, n in (("train", splits[0], n_train), ("test", splits[1], n_test)):
        out[split] = []
        for m in _messages(n, seed, source):
            record = to_record(m)
            out[split].append(Example(task, m["message"], canonical_json(record, task),
                                      record, m["template_id"]))
    return out


def loan_intent_task(n_train: int, n_test: int, seed: int = 0,
                     validation: bool = False) -> dict[str, list[Example]]:
    """Loan-servicing messages -> {"intent", "amount", "account"}; test templates held out (chapter 1).

    ``validation=True``: "train" from the fit templates, "test" from the val templates (both
    inside the training templates): the split for choosing hyper-parameters (chapter 4).
    """
    return _examples("loan_intent", n_train, n_test, seed, lambda m: {
        "intent": m["intent"], "amount": m["amount"], "account": m["account"]}, validation)


def triage_task(n_train: int, n_test: int, seed: int = 0,
                validation: bool = False) -> dict[str, list[Example]]:
    """The same messages -> {"team", "urgency"}: a second task for adapter swapping (chapter 1)."""
    return _examples("triage", n_train, n_test, seed, lambda m: {
        "team": TEAM_OF_INTENT[m["intent"]], "urgency": m["urgency"]}, validation)
