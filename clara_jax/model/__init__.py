"""The decoder, its LoRA adapters, and CLaRa's roles and stage losses on top of it.

Shape letters, one meaning each across clara_jax (model, ops, the parameter shapes of
weights, infer, eval, train, bench):

    B   batch: questions, or sequences of a plain pass
    T   positions of a pass (its queries)
    S   key positions an attention reads: T, or the length of a KV cache
    V   vocabulary rows, base + X (X: CLaRa's special-token rows)
    D   model (hidden) width
    F   MLP inner width
    L   decoder layers (the leading axis of scanned parameters)
    H   query heads
    K   key/value heads
    G   query heads per key/value head, H / K
    hd  head width
    Q   the G * T queries of one key/value head stacked along one axis
    R   rows: of an encoder batch (documents or questions, any leading axes flattened),
        or of one device's shard of the memory index
    N   candidate documents per question (in the memory index: the documents it holds)
    k   documents in one generator prompt (selected in stage 2; stage1: 1)
    n_mem  memory tokens per encoder row
    J   memory slots of one generator prompt, k * n_mem
    E   one document's memories flattened, n_mem * D (the memory index's rows)
    Ld, Lq  text block of a document / question before its memory tokens (Lt: either)
    P, A    prompt and answer regions of a generator row (T = P + A)

A variable's suffix lists its axes in order with these letters in lower case: `x_btd` is
[B, T, D], `doc_mem_bnmd` [B, N, n_mem, D] (m: the n_mem axis), `slot_positions_bj` [B, J].
A `d` right after a head letter is the head width: `q_bthd` is [B, T, H, hd], `k_bskd`
[B, S, K, hd]; in one KV head's attention, `q_bqd` is [B, Q, hd].
"""
