#!/usr/bin/env python3
"""Writes two synthetic instruction-tuning sites (JSONL with instruction/input/output), for trying
instruction federations: a clinic that triages notes and a bank that extracts amounts.

  python3 scripts/instruction_sites.py OUT_DIR   # writes OUT_DIR/clinic.jsonl, OUT_DIR/bank.jsonl
"""

import json
import random
import sys
from pathlib import Path

URGENT = ["chest pain radiating to the left arm", "sudden weakness of one side of the face",
          "shortness of breath at rest", "coughing up blood", "a seizure lasting five minutes",
          "severe bleeding after a fall", "confusion and a high fever", "crushing chest pressure"]
ROUTINE = ["a mild rash on the forearm", "a repeat prescription request", "seasonal hay fever",
           "a sore knee after running", "a question about a vaccination", "dry skin in winter",
           "a blood pressure check", "trouble sleeping for a week"]
CURRENCIES = ["EUR", "USD", "GBP", "CHF"]
PAYEES = ["ACME GmbH", "Northwind Ltd", "Contoso SA", "Globex Inc", "Initech AG"]
KINDS = ["Wire", "Card payment", "Direct debit", "Transfer"]


def clinic(rng, count):
    for _ in range(count):
        urgent = rng.random() < 0.5
        symptom = rng.choice(URGENT if urgent else ROUTINE)
        yield {
            "instruction": "Classify the urgency of this triage note as URGENT or ROUTINE.",
            "input": f"Patient, {rng.randint(18, 90)}, presents with {symptom}.",
            "output": "URGENT" if urgent else "ROUTINE",
        }


def bank(rng, count):
    for _ in range(count):
        amount = f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
        currency = rng.choice(CURRENCIES)
        yield {
            "instruction": "Extract the amount and currency from this transaction note.",
            "input": f"{rng.choice(KINDS)} of {amount} {currency} to {rng.choice(PAYEES)} on day {rng.randint(1, 28)}.",
            "output": f"{amount} {currency}",
        }


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for name, make in [("clinic", clinic), ("bank", bank)]:
        with open(out / f"{name}.jsonl", "w") as file:
            for example in make(rng, 120):
                file.write(json.dumps(example) + "\n")
    print(f"wrote {out}/clinic.jsonl and {out}/bank.jsonl")


if __name__ == "__main__":
    main()
