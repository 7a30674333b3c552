"""Extra golden case at 7c2028f (run after capture_at_7c2028f.py, with its OUT as the argument, which it extends): seeded batches where rows stop at different steps (a stop id that
some rows draw early), so a decode core that dropped finished rows from a shared generator's draws
would be caught."""
import json, sys, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))  # capture_at_7c2028f.py, as `capture`
import capture_at_7c2028f as c
from lima_core.hf import load_pretrained, save_pretrained
from lima_core.sampling import generate_batch
from lima_core.data import prompt_ids
from lima_core.tokenizer import Tokenizer

golden = json.loads(Path(sys.argv[1]).read_text())
tok = Tokenizer(c.BUNDLED_TOKENIZER)
new = []
with tempfile.TemporaryDirectory() as tmp:
    for variant, eot in (("plain", False), ("eot", True)):
        model, _ = c.build(tok, eot)
        folder = Path(tmp) / f"tiny-{variant}"
        save_pretrained(model, folder, tokenizer=tok)
        loaded = load_pretrained(folder)
        prompts = [prompt_ids(tok, c.conversation(p)) for p in c.PROMPTS]
        base = next(x for x in golden["cases"] if x["path"] == "generate_batch" and x["variant"] == variant and x["name"] == "seeded batch")
        rows = [r["ids"] for r in base["results"]]
        # the token at step 6 of row 1 that rows 0, 2.. do not draw before step 30: row 1 stops early
        for step in range(3, 20):
            extra = rows[1][step]
            firsts = [r.index(extra) if extra in r else 99 for r in rows]
            if sorted(set(firsts))[:2] and len(set(firsts)) >= 3 and extra not in (tok.eot_id, tok.eos_id):
                break
        stop_ids = {tok.eot_id, tok.eos_id, extra}
        settings = dict(c.SAMPLED)
        out = generate_batch(loaded, prompts, stop_ids=stop_ids, generator=torch.Generator().manual_seed(c.SEED), **settings)
        lengths = [len(r) for r in out]
        print(variant, "extra stop", extra, "lengths", lengths, file=sys.stderr)
        assert len(set(lengths)) >= 2
        new.append({"path": "generate_batch", "variant": variant, "name": "seeded batch, rows stopping at different steps",
                    "settings": {**settings, "stop_ids": sorted(stop_ids), "generator_seed": c.SEED,
                                 "batch": "all prompts in one call, one generator for the call; a third stop id some rows draw early"},
                    "results": [{"prompt": i, "ids": ids, "text": tok.decode(ids), "finish": c.finish_of(ids, stop_ids)} for i, ids in enumerate(out)]})
golden["cases"] += new
Path(sys.argv[1]).write_text(json.dumps(golden, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")
