import time, torch, sys, json
import casspec
torch.set_num_threads(2)
e = casspec.load(sys.argv[1])
qs=[json.loads(l) for l in open('/work/shared/data/spec_bench/question.jsonl')]
bycat={}
for q in qs: bycat.setdefault(q['category'],[]).append(q)
prompts=[bycat[c][0]['turns'][0] for c in ['writing','translation','summarization','qa','math_reasoning','rag']]
chat = e.has_chat_template
def mk(p): return [{"role":"user","content":p}] if chat else f"Question: {p}\nAnswer:"
methods=sys.argv[2].split(',')
t=time.time(); e.generate(mk("hi"), "casspec", max_new_tokens=8); print("warm", time.time()-t, flush=True)
tot={m:[0,0.0] for m in methods}
for p in prompts:
    ref=None
    for m in methods:
        out=e.generate(mk(p), m, max_new_tokens=int(sys.argv[3]))
        if m=='ar': ref=out.token_ids
        tot[m][0]+=out.stats.new_tokens; tot[m][1]+=out.stats.wall_time
        print(m, f"{out.stats.tokens_per_s:.1f}", f"mal={out.stats.mean_accepted_length:.2f}", out.token_ids==ref, {k:(v.proposed,v.accepted,v.forwards) for k,v in out.stats.drafters.items()}, flush=True)
for m,(n,t) in tot.items(): print("TOTAL", m, f"{n/t:.2f} tok/s", f"speedup {n/t/(tot['ar'][0]/tot['ar'][1]):.2f}")
