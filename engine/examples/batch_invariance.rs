//! Development aid: does a token's output depend on what else llama.cpp computes in the same
//! decode call? Computes the same prompt's last-token logits (and a greedy continuation) in
//! different batch shapes, on the scheduler's context settings, and prints which agree bit
//! for bit with a fresh, alone computation. The evidence behind engine/README.md's
//! *Reproducible sampling*.
//!
//! ```sh
//! cargo run --release -p ringside-engine --example batch_invariance [-- MODEL.gguf]
//! ```

use std::num::NonZeroU32;
use std::process::ExitCode;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;
use ringside_engine::model;

const PARALLEL: u32 = 6;
const CTX: u32 = 2048;

/// One sequence's part of a decode call: `tokens` at positions from `pos`.
struct Part<'a> {
    seq: i32,
    pos: i32,
    tokens: &'a [LlamaToken],
}

fn decode(ctx: &mut LlamaContext<'_>, parts: &[Part<'_>]) -> Vec<Vec<f32>> {
    let n: usize = parts.iter().map(|p| p.tokens.len()).sum();
    let mut batch = LlamaBatch::new(n.max(1), 1);
    let mut last = Vec::new();
    for p in parts {
        for (k, &t) in p.tokens.iter().enumerate() {
            let is_last = k + 1 == p.tokens.len();
            let pos = p.pos + i32::try_from(k).expect("pos");
            batch.add(t, pos, &[p.seq], is_last).expect("batch add");
            if is_last {
                last.push(batch.n_tokens() - 1);
            }
        }
    }
    ctx.decode(&mut batch).expect("decode");
    last.iter()
        .map(|&i| ctx.get_logits_ith(i).to_vec())
        .collect()
}

fn clear(ctx: &mut LlamaContext<'_>) {
    ctx.clear_kv_cache();
}

/// Decodes `tokens` of one sequence at `pos`; the logits of its last token.
fn decode_one(ctx: &mut LlamaContext<'_>, seq: i32, pos: i32, tokens: &[LlamaToken]) -> Vec<f32> {
    decode(ctx, &[Part { seq, pos, tokens }]).remove(0)
}

/// A fresh KV with the prompt's first `kept` tokens decoded in one call and
/// the rest in a second: what a reused prefix of `kept` tokens gives.
fn prefix_then_rest(ctx: &mut LlamaContext<'_>, prompt: &[LlamaToken], kept: usize) -> Vec<f32> {
    clear(ctx);
    decode_one(ctx, 0, 0, &prompt[..kept]);
    decode_one(ctx, 0, to_i32(kept), &prompt[kept..])
}

fn argmax(l: &[f32]) -> usize {
    l.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map_or(0, |(i, _)| i)
}

fn compare(name: &str, reference: &[f32], got: &[f32]) -> bool {
    let same = reference
        .iter()
        .zip(got)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let max_diff = reference
        .iter()
        .zip(got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!(
        "{name:<58} bit-identical: {:<5} max|diff| {max_diff:.3e}  argmax {} vs {}",
        same,
        argmax(reference),
        argmax(got)
    );
    same
}

/// Greedy continuation of `seq` from `logits` for `steps` tokens, each step decoded together
/// with one token of each sequence in `companions` (kept decoding their own greedy text).
fn greedy(
    ctx: &mut LlamaContext<'_>,
    seq: i32,
    mut pos: i32,
    mut logits: Vec<f32>,
    companions: &mut [(i32, i32, Vec<f32>)],
    steps: usize,
) -> Vec<Vec<f32>> {
    let mut trace = Vec::new();
    for _ in 0..steps {
        let token = [LlamaToken::new(i32::try_from(argmax(&logits)).expect("id"))];
        let ctoks: Vec<[LlamaToken; 1]> = companions
            .iter()
            .map(|c| [LlamaToken::new(i32::try_from(argmax(&c.2)).expect("id"))])
            .collect();
        let mut parts = vec![Part {
            seq,
            pos,
            tokens: &token,
        }];
        for (c, t) in companions.iter().zip(&ctoks) {
            parts.push(Part {
                seq: c.0,
                pos: c.1,
                tokens: t,
            });
        }
        let mut out = decode(ctx, &parts).into_iter();
        logits = out.next().expect("logits");
        for c in companions.iter_mut() {
            c.2 = out.next().expect("logits");
            c.1 += 1;
        }
        pos += 1;
        trace.push(logits.clone());
    }
    trace
}

fn first_divergence(a: &[Vec<f32>], b: &[Vec<f32>]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.iter().zip(y).any(|(p, q)| p.to_bits() != q.to_bits()))
}

fn main() -> ExitCode {
    let path = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .or_else(|| model::resolve_model_path(None).ok());
    let Some(path) = path else {
        eprintln!("batch_invariance: no model (run scripts/install-model.sh)");
        return ExitCode::FAILURE;
    };
    let loaded = match model::load(&path, 0, None) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("batch_invariance: {e}");
            return ExitCode::FAILURE;
        }
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() as i32);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(CTX * PARALLEL))
        .with_n_batch(256)
        .with_n_ubatch(256)
        .with_n_seq_max(PARALLEL)
        .with_kv_unified(false)
        .with_swa_full(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let llama = &loaded.model.llama;
    let mut ctx = llama.new_context(&loaded.backend, params).expect("context");
    let tok = |s: &str| loaded.model.tokenize_text(s);
    let p = tok("My favourite food is");
    let n = p.len();
    let q = tok("Once upon a time there was");
    println!("prompt: {n} tokens; threads {threads}");

    // A: fresh, alone (what a request gets with --no-prompt-cache on an idle engine).
    clear(&mut ctx);
    let a = decode_one(&mut ctx, 0, 0, &p);

    let mut all_same = true;
    // B: the prompt cache today: prefix kept, the last token decoded alone (1 row).
    let b = prefix_then_rest(&mut ctx, &p, n - 1);
    all_same &= compare("B reuse n-1, last token alone (1 row)", &a, &b);

    // F: re-decode the last two tokens (2 rows, one sequence).
    let f = prefix_then_rest(&mut ctx, &p, n - 2);
    all_same &= compare("F reuse n-2, last two tokens (2 rows)", &a, &f);

    // C/D/E: last token together with k other sequences' decode tokens (k+1 rows).
    for k in [1usize, 2, 3, 4, 5] {
        clear(&mut ctx);
        decode_one(&mut ctx, 0, 0, &p[..n - 1]);
        for s in 1..=k {
            decode_one(&mut ctx, to_i32(s), 0, &q);
        }
        let qn = to_i32(q.len());
        let extra: Vec<[LlamaToken; 1]> = (0..k).map(|_| [q[1]]).collect();
        let mut parts = vec![Part {
            seq: 0,
            pos: to_i32(n - 1),
            tokens: &p[n - 1..],
        }];
        for (s, t) in extra.iter().enumerate() {
            parts.push(Part {
                seq: to_i32(s + 1),
                pos: qn,
                tokens: t,
            });
        }
        let c = decode(&mut ctx, &parts).remove(0);
        all_same &= compare(
            &format!(
                "reuse n-1, last token + {k} other sequences' tokens ({} rows)",
                k + 1
            ),
            &a,
            &c,
        );
    }

    // G: fresh, with another sequence's decode token in the same call (seq 1, consecutive).
    clear(&mut ctx);
    decode_one(&mut ctx, 1, 0, &q);
    let qn = to_i32(q.len());
    let g = decode(
        &mut ctx,
        &[
            Part {
                seq: 1,
                pos: qn,
                tokens: &q[1..2],
            },
            Part {
                seq: 0,
                pos: 0,
                tokens: &p,
            },
        ],
    )
    .remove(1);
    all_same &= compare("G fresh prompt + 1 other sequence's token", &a, &g);

    // Decode: 24 greedy steps alone vs with 1 and 3 companions decoding alongside.
    let steps = 24;
    let run = |ctx: &mut LlamaContext<'_>, k: usize| {
        clear(ctx);
        let l0 = decode_one(ctx, 0, 0, &p);
        let mut comps = Vec::new();
        for s in 1..=k {
            let s = to_i32(s);
            let l = decode_one(ctx, s, 0, &q);
            comps.push((s, to_i32(q.len()), l));
        }
        greedy(ctx, 0, to_i32(n), l0, &mut comps, steps)
    };
    let alone = run(&mut ctx, 0);
    for k in [1usize, 3, 4] {
        let with = run(&mut ctx, k);
        let d = first_divergence(&alone, &with);
        let tokens_same = alone.iter().zip(&with).all(|(x, y)| argmax(x) == argmax(y));
        println!(
            "decode {steps} steps with {k} companions: first logits difference at step {d:?}; greedy tokens same: {tokens_same}"
        );
        all_same &= d.is_none();
    }

    // Long context (n_kv >= 512): decode alone vs in a ubatch with other sequences (all rows
    // gemv-sized, so only attention's path differs: llama.cpp splits the KV of a lone token).
    let long: Vec<LlamaToken> = (0..100)
        .flat_map(|_| tok(" the quick brown fox jumps over"))
        .collect();
    let long = &long[..600.min(long.len())];
    let prefill = |ctx: &mut LlamaContext<'_>, seq: i32, toks: &[LlamaToken], chunk: usize| {
        let mut out = Vec::new();
        for (k, c) in toks.chunks(chunk).enumerate() {
            out = decode(
                ctx,
                &[Part {
                    seq,
                    pos: to_i32(k * chunk),
                    tokens: c,
                }],
            )
            .remove(0);
        }
        out
    };
    let long_run = |ctx: &mut LlamaContext<'_>, k: usize| {
        clear(ctx);
        let l0 = prefill(ctx, 0, long, 32);
        let mut comps = Vec::new();
        for s in 1..=k {
            let s = to_i32(s);
            let l = prefill(ctx, s, &q, 32);
            comps.push((s, to_i32(q.len()), l));
        }
        greedy(ctx, 0, to_i32(long.len()), l0, &mut comps, 8)
    };
    let alone = long_run(&mut ctx, 0);
    for k in [1usize, 2] {
        let with = long_run(&mut ctx, k);
        println!(
            "{} tokens of context, decode with {k} companions ({} rows): first logits difference at step {:?}",
            long.len(),
            k + 1,
            first_divergence(&alone, &with)
        );
    }

    // The same with a dummy token in the neighbouring sequence (removed after each step):
    // 2 rows, so attention takes the per-row path it takes with real companions.
    let paired = {
        clear(&mut ctx);
        let mut logits = prefill(&mut ctx, 0, long, 32);
        let mut trace = Vec::new();
        let start = to_i32(long.len());
        for pos in start..start + 8 {
            let token = [LlamaToken::new(to_i32(argmax(&logits)))];
            let dummy = [q[0]];
            logits = decode(
                &mut ctx,
                &[
                    Part {
                        seq: 0,
                        pos,
                        tokens: &token,
                    },
                    Part {
                        seq: 1,
                        pos: 0,
                        tokens: &dummy,
                    },
                ],
            )
            .remove(0);
            ctx.clear_kv_cache_seq(Some(1), None, None)
                .expect("rm dummy");
            trace.push(logits.clone());
        }
        trace
    };
    let two = long_run(&mut ctx, 1);
    let three = long_run(&mut ctx, 2);
    println!(
        "long context: paired with a dummy vs 1 companion: {:?}; vs 2 companions: {:?} (None = bit-identical)",
        first_divergence(&paired, &two),
        first_divergence(&paired, &three)
    );
    // Canonical chunks (32) fresh vs reusing 8 whole chunks kept from a different, longer prompt.
    let mut other = long[..300].to_vec();
    other.extend_from_slice(&q);
    clear(&mut ctx);
    let fresh = prefill(&mut ctx, 0, &long[..290], 32);
    clear(&mut ctx);
    prefill(&mut ctx, 0, &other, 32);
    ctx.clear_kv_cache_seq(Some(0), Some(256), None)
        .expect("trim");
    let mut reused = Vec::new();
    for (k, c) in long[256..290].chunks(32).enumerate() {
        reused = decode_one(&mut ctx, 0, to_i32(256 + k * 32), c);
    }
    compare(
        "290-token prompt: fresh vs 256 reused from another prompt",
        &fresh,
        &reused,
    );
    for chunk in [64usize, 128] {
        clear(&mut ctx);
        let t = std::time::Instant::now();
        prefill(&mut ctx, 0, &long[..512], chunk);
        println!(
            "prefill 512 tokens in chunks of {chunk}: {:.1} tokens/s",
            512.0 / t.elapsed().as_secs_f64()
        );
    }
    // Prompt chunking: the same 600 tokens in chunks of 256 vs 32 (last logits).
    clear(&mut ctx);
    let c256 = prefill(&mut ctx, 0, long, 256);
    clear(&mut ctx);
    let c32 = prefill(&mut ctx, 0, long, 32);
    compare("600-token prompt in chunks of 32 vs 256", &c256, &c32);

    // Cost: 4 sequences decoding 32 steps together (one call) vs one call each; and a
    // 512-token prefill in chunks of 256 vs 32.
    let timed = |ctx: &mut LlamaContext<'_>, together: bool, group: usize| {
        clear(ctx);
        for s in 0..4 {
            prefill(ctx, s, &q, 32);
        }
        let t = std::time::Instant::now();
        let qn = to_i32(q.len());
        for step in 0..32 {
            let toks = [q[1]];
            let parts: Vec<Part<'_>> = (0..4)
                .map(|s| Part {
                    seq: s,
                    pos: qn + step,
                    tokens: &toks,
                })
                .collect();
            if together {
                for g in parts.chunks(group) {
                    decode(ctx, g);
                }
            } else {
                for part in &parts {
                    decode(ctx, std::slice::from_ref(part));
                }
            }
        }
        128.0 / t.elapsed().as_secs_f64()
    };
    for _ in 0..2 {
        let batched = timed(&mut ctx, true, 4);
        let threes = timed(&mut ctx, true, 3);
        let solo = timed(&mut ctx, false, 1);
        println!(
            "decode tokens/s, 4 sequences: one call {batched:.1}, calls of <=3 {threes:.1}, one call per sequence {solo:.1}"
        );
    }
    for chunk in [256usize, 32, 256, 32] {
        clear(&mut ctx);
        let t = std::time::Instant::now();
        prefill(&mut ctx, 0, &long[..512], chunk);
        println!(
            "prefill 512 tokens in chunks of {chunk}: {:.1} tokens/s",
            512.0 / t.elapsed().as_secs_f64()
        );
    }
    println!("all bit-identical: {all_same}");
    ExitCode::SUCCESS
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).expect("fits in i32")
}
