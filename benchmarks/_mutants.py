# ruff: noqa: E501 - mutants quote source lines as they are
"""The mutants of the mutation campaign (``benchmarks/mutation.py``).

Each is one realistic bug in an exact pass or an analysis it uses: ``original`` (text that occurs
exactly once in ``path``) is replaced by ``mutated``, and the test files in ``tests`` should fail.
``bug`` says what a real engineer would have done wrong. A mutant shown to be equivalent (no
input can tell it apart) is not listed; the campaign's docstring in docs/testing.md says which
were dropped and why.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutant(NamedTuple):
    id: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    bug: str


MUTANTS: list[Mutant] = [
    # === centering, folding, prernorm, crmsnorm and the norm ops =================================
    # --- rewriter/analysis/centering.py -------------------------------------------------------------------
    Mutant(
        "centering-ln-eps-hardcoded-1e-5",
        "rewriter/analysis/centering.py",
        "    eps = 1e-5 if eps is None else eps  # aten.layer_norm's default, now explicit",
        "    eps = 1e-5  # aten.layer_norm's default, now explicit",
        ("tests/test_row_blocks.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "A LayerNorm eps hard-coded to 1e-5 in centering: layer_to_rms writes aten.layer_norm's "
        "default instead of the LN's own eps, which is right for GPT-2/OPT/NeoX defaults and wrong "
        "for any model configured with another eps (1e-6, 1e-12, 1e-3).",
    ),
    Mutant(
        "center-out-in-linear-divides-by-in-features",
        "rewriter/analysis/centering.py",
        "        out = lin.out_features\n",
        "        out = lin.in_features\n",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "The column mean of an (out, in) writer is its column sum over out rows; dividing by "
        "in_features is the classic shape mix-up, invisible on square maps (attention out_proj) "
        "and wrong on the MLP down projection.",
    ),
    Mutant(
        "center-conv1d-writer-over-wrong-axis",
        "rewriter/analysis/centering.py",
        """            lambda b: (r := b.rows(weight)) - r.mean(-1, keepdim=True),
            note="center output columns",""",
        """            lambda b: (r := b.rows(weight)) - r.mean(0, keepdim=True),
            note="center output columns",""",
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "GPT-2's (in, out) Conv1D weight must lose each row's mean over the outputs; taking the "
        "mean over dim 0 (the inputs) is the axis confusion between the two weight layouts.",
    ),
    Mutant(
        "center-bias-skipped-for-conv1d",
        "rewriter/analysis/centering.py",
        "    if lin.bias is not None:\n        readers =",
        '    if lin.bias is not None and lin.layout == "out_in":\n        readers =',
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Dropped bias term: addmm carries its bias as the first argument, and an engineer who "
        "only thought of aten.linear's bias leaves Conv1D biases uncentered, so the stream is "
        "not zero-mean in GPT-2.",
    ),
    Mutant(
        "center-bias-in-float32",
        "rewriter/analysis/centering.py",
        'lambda b: (v := b.whole(bias)) - v.mean(), note="center bias"',
        'lambda b: (v := b.whole(bias).float()) - v.mean(), note="center bias"',
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Wrong dtype for the float64 computation: the bias is rounded to float32 before "
        "centering, harmless for float32 models but a ~1e-8 relative error that float64 models "
        "(held to 1e-10) expose.",
    ),
    Mutant(
        "center-tables-grouped-by-op-not-tensor",
        "rewriter/analysis/centering.py",
        "            tables.setdefault(str(node.target), []).append(writer)",
        "            tables.setdefault(str(writer.node.target), []).append(writer)",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Grouping embedding writers by writer.node.target (aten.embedding) instead of the table's "
        "name puts token and position embeddings in one group, so only the first table is "
        "centered: a skipped writer of the residual stream.",
    ),
    Mutant(
        "center-table-without-untying",
        "rewriter/analysis/centering.py",
        "    owned = untie_for(rw, node, users)\n",
        "    owned = node\n",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Missed tie between weights: the token embedding is centered in place although the LM "
        "head reads the same tensor, so the head's logits change.",
    ),
    Mutant(
        "center-table-mean-over-vocab",
        "rewriter/analysis/centering.py",
        "            lambda b: (r := b.rows(name)) - r.mean(-1, keepdim=True),",
        "            lambda b: (r := b.rows(name)) - r.mean(0, keepdim=True),",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Wrong axis: each embedding row must be zero-mean over the hidden dim; the mean over "
        "the table's rows (dim 0) centers each channel over the vocabulary instead.",
    ),
    Mutant(
        "center-linear-untie-first-application-only",
        "rewriter/analysis/centering.py",
        "    weight_node = untie_for(rw, lin.weight, [x.node for x in lins])",
        "    weight_node = untie_for(rw, lin.weight, [lin.node])",
        ("tests/test_deploy.py",),
        "Missed tie: a module applied twice (the prefill and decode halves of a step graph) "
        "shares one weight; untying for the first application only gives the other half an "
        "uncentered copy.",
    ),
    Mutant(
        "explicit-centering-mean-over-sequence",
        "rewriter/analysis/centering.py",
        "        aten.mean.dim, (node, [-1], True), before=anchor,",
        "        aten.mean.dim, (node, [-2], True), before=anchor,",
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Wrong dim in the explicit x - mean(x) after BLOOM's embedding LayerNorm: the mean over "
        "the sequence axis instead of the hidden axis leaves the stream non-zero-mean.",
    ),
    Mutant(
        "explicit-centering-rewires-one-user",
        "rewriter/analysis/centering.py",
        "    users = [u for u in node.users if not is_metadata_reader(u)]\n",
        "    users = [u for u in node.users if not is_metadata_reader(u)][:1]\n",
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Assuming the writer has one consumer: BLOOM's embedding LayerNorm output feeds both the "
        "first block's LayerNorm and the residual add, and the add keeps the uncentered value.",
    ),
    Mutant(
        "layer-to-rms-swaps-gamma-and-beta",
        "rewriter/analysis/centering.py",
        "    x, shape, gamma, beta, eps = args[:5]",
        "    x, shape, beta, gamma, eps = args[:5]",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Misremembered aten.layer_norm argument order (input, shape, weight, bias, eps): the "
        "bias becomes the RMSNorm's gain and the gain is added afterwards.",
    ),
    # --- passes/prernorm.py ----------------------------------------------------------------------
    Mutant(
        "prernorm-anchors-on-rms-norm-too",
        "passes/prernorm.py",
        "        stream = find_stream(gm, anchors=(aten.layer_norm.default,))",
        "        stream = find_stream(gm, anchors=(aten.layer_norm.default, aten.rms_norm.default))",
        ("tests/test_prernorm.py",),
        "Anchoring the analysis on every norm op: the pass is no longer idempotent, a second run "
        "rewrites its own rms_norm nodes as if they were LayerNorms (their eps taken as a bias).",
    ),
    Mutant(
        "prernorm-ignores-center-unknown-writers-option",
        "passes/prernorm.py",
        "        check_writers(stream, allow_unknown=self.center_unknown_writers)",
        "        check_writers(stream, allow_unknown=True)",
        ("tests/test_prernorm.py",),
        "The refusal of unknown writers is bypassed, so a train-mode dropout (or any unknown op) "
        "is silently wrapped in an explicit centering instead of being refused by name.",
    ),
    # --- rewriter/analysis/residual.py ----------------------------------------------------------------------
    Mutant(
        "stream-walk-follows-only-first-addend",
        "rewriter/analysis/residual.py",
        "            stack.extend(node.args)",
        "            stack.append(node.args[0])",
        ("tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Skipped writers of the residual stream: following only the residual operand of "
        "add(residual, branch) never reaches the attention/MLP outputs (nor the position "
        "embedding), so they are never centered or narrowed.",
    ),
    Mutant(
        "stream-closure-skips-writers",
        "rewriter/analysis/residual.py",
        "    members = stream.nodes | {w.node for w in stream.writers}",
        "    members = set(stream.nodes)",
        ("tests/test_prernorm.py",),
        "The closure check only looks at stream nodes, so a Post-LN model (whose norm output is a "
        "writer also read by attention) is no longer refused by name before anything changes.",
    ),
    # --- rewriter/analysis/folding.py ---------------------------------------------------------------------
    Mutant(
        "fold-gamma-before-beta",
        "rewriter/analysis/folding.py",
        """        if beta is not None:
            reader = ensure_bias(rw, reader, also=group[1:])
            rw.apply(bias_fold_edit(reader, beta))  # reads the weight before gamma scales it
        if gamma is not None:
            rw.apply(_weight_edit(reader, gamma))""",
        """        if gamma is not None:
            rw.apply(_weight_edit(reader, gamma))
        if beta is not None:
            reader = ensure_bias(rw, reader, also=group[1:])
            rw.apply(bias_fold_edit(reader, beta))""",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_ln_freeze.py"),
        "Edit order: folding gamma first means the bias fold reads W diag(gamma), giving "
        "b + W diag(gamma) beta instead of b + W beta (a stale-vs-fresh weight mix-up).",
    ),
    Mutant(
        "fold-beta-wrong-sign",
        "rewriter/analysis/folding.py",
        "            lambda b: b.whole(bias) + b.matvec(weight, beta),",
        "            lambda b: b.whole(bias) - b.matvec(weight, beta),",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_crmsnorm.py"),
        "Wrong sign when folding the norm's bias through an (out, in) reader: b - W beta.",
    ),
    Mutant(
        "fold-gamma-wrong-axis-out-in",
        "rewriter/analysis/folding.py",
        "            lambda b: b.rows(weight) * b.whole(gamma)[None, :],",
        "            lambda b: b.rows(weight) * b.whole(gamma)[:, None],",
        ("tests/test_fold_ln.py", "tests/test_prernorm.py", "tests/test_ln_freeze.py"),
        "W diag(gamma) scales the input columns; broadcasting gamma over rows computes "
        "diag(gamma) W (right only for Conv1D's layout; silently wrong on square q/k/v maps).",
    ),
    Mutant(
        "norm-unit-eps-index-off-by-one",
        "rewriter/analysis/folding.py",
        '        index = 4 if self.kind == "layer" else 3',
        "        index = 3",
        ("tests/test_fold_ln.py", "tests/test_crmsnorm.py"),
        "Off-by-one in the eps position: rms_norm's eps is args[3] but layer_norm's is args[4]; "
        "for a LayerNorm args[3] is the bias, which then stands in for the eps.",
    ),
    Mutant(
        "frozen-centering-conv1d-divides-by-out-features",
        "rewriter/analysis/folding.py",
        "    width = lin.in_features\n",
        "    width = lin.out_features\n",
        ("tests/test_ln_freeze.py", "tests/test_deploy.py"),
        "W C for an (in, out) Conv1D reader of a frozen centered norm: the column mean is over "
        "the in_features rows; dividing by out_features (3d for c_attn) under-centers it.",
    ),
    # --- passes/fold_ln.py -----------------------------------------------------------------------
    Mutant(
        "fold-ln-ignores-other-applications",
        "passes/fold_ln.py",
        '            fold_affine(rw, unit, readers, rule="fold-into-reader", also=also)',
        '            fold_affine(rw, unit, readers, rule="fold-into-reader")',
        ("tests/test_deploy.py",),
        "Missed tie: the other applications of one norm module (the decode half of a step graph) "
        "are not passed along, so the shared reader weights are untied and stored twice.",
    ),
    # --- passes/crmsnorm.py ----------------------------------------------------------------------
    Mutant(
        "crms-absorb-dropped-column-wrong-sign",
        "passes/crmsnorm.py",
        "            return scaled[:, :last] - scaled[:, last:]",
        "            return scaled[:, :last] + scaled[:, last:]",
        ("tests/test_crmsnorm.py",),
        "Wrong sign in the (d-1)-dim coordinates: y_d = -sum_{i<d} y_i, so the dropped column "
        "is subtracted, not added.",
    ),
    Mutant(
        "crms-absorb-dropped-column-without-gamma",
        "passes/crmsnorm.py",
        "            return scaled[:, :last] - scaled[:, last:]",
        "            return scaled[:, :last] - rows[:, last:]",
        ("tests/test_crmsnorm.py",),
        "Dropped term: the dropped column must be W[:, d] gamma_d; using the unscaled column "
        "forgets gamma on the implied coordinate.",
    ),
    Mutant(
        "crms-absorb-conv1d-dropped-row-off-by-one",
        "passes/crmsnorm.py",
        "            final = b.rows(weight, last, width)  # the dropped input",
        "            final = b.rows(weight, last - 1, last)  # the dropped input",
        ("tests/test_crmsnorm.py",),
        "Off-by-one in the (in, out) reader: the dropped input is row d-1 (0-based), not row "
        "d-2, so the wrong row is subtracted from every kept row.",
    ),
    Mutant(
        "crms-conv1d-writer-drops-first-column",
        "passes/crmsnorm.py",
        "                    lambda b: b.rows(weight)[:, : width - 1],",
        "                    lambda b: b.rows(weight)[:, 1:],",
        ("tests/test_crmsnorm.py",),
        "Wrong coordinate change: Conv1D writers drop the first output coordinate while "
        "embeddings and readers assume the last one is the implied coordinate.",
    ),
    Mutant(
        "crms-absorb-stale-map-after-ensure-bias",
        "passes/crmsnorm.py",
        "        lin = ensure_bias(rw, lin)\n",
        "        ensure_bias(rw, lin)\n",
        ("tests/test_crmsnorm.py",),
        "Keeping a stale LinearMap: ensure_bias returns the refreshed map with the new bias; "
        "the old one has no bias name, so beta is folded into a tensor that does not exist.",
    ),
    Mutant(
        "crms-shrinks-full-width-region-writers",
        "passes/crmsnorm.py",
        "        shrink = {w for n in compressed for w in stream.regions[n][1]}",
        "        shrink = {w.node for w in stream.writers}",
        ("tests/test_crmsnorm.py",),
        "Dropping the last coordinate of every writer, including the word embedding that feeds "
        "BLOOM's full-width embedding LayerNorm region, which must keep width d.",
    ),
    Mutant(
        "crms-reader-views-not-narrowed",
        "passes/crmsnorm.py",
        '    _narrow_reader_input(rw, lin, unit, width)\n    rw.counters["absorb-into-reader"] += 1',
        '    rw.counters["absorb-into-reader"] += 1',
        ("tests/test_crmsnorm.py",),
        "Skipping the reader-side views: GPT-2's Conv1D reshapes its input to (-1, d), which "
        "must become (-1, d - 1) once the stream is compressed.",
    ),
    Mutant(
        "crms-eps-hardcoded",
        "passes/crmsnorm.py",
        "        (x, float(unit.eps)),",
        "        (x, 1e-5),",
        ("tests/test_row_blocks.py", "tests/test_crmsnorm.py"),
        "The CRMSNorm gets the common 1e-5 instead of the LayerNorm's own eps (right for default "
        "configs only).",
    ),
    # --- rewriter/ops/norms.py -------------------------------------------------------------------
    Mutant(
        "crms-norm-width-off-by-one",
        "rewriter/ops/norms.py",
        "    xs = _opmath(x)\n    width = xs.shape[-1] + 1\n",
        "    xs = _opmath(x)\n    width = xs.shape[-1]\n",
        ("tests/test_ops.py", "tests/test_crmsnorm.py"),
        "Off-by-one in d: the stored vector has d - 1 coordinates, so the mean square divides "
        "by shape[-1] + 1, not shape[-1].",
    ),
    Mutant(
        "crms-norm-eps-inside-the-mean",
        "rewriter/ops/norms.py",
        "    mean_square = (xs.pow(2).sum(-1, keepdim=True) + implied.pow(2)) / width\n"
        "    return (xs * torch.rsqrt(mean_square + eps)).to(x.dtype)",
        "    mean_square = (xs.pow(2).sum(-1, keepdim=True) + implied.pow(2) + eps) / width\n"
        "    return (xs * torch.rsqrt(mean_square)).to(x.dtype)",
        ("tests/test_ops.py", "tests/test_crmsnorm.py"),
        "Wrong eps: added to the sum of squares before dividing by d, so the effective eps is "
        "eps / d instead of RMSNorm's eps on the mean square.",
    ),
    Mutant(
        "crms-norm-backward-implied-sign",
        "rewriter/ops/norms.py",
        "    grad_x = gs * r - r.pow(3) * (xs + implied) * dot / width",
        "    grad_x = gs * r - r.pow(3) * (xs - implied) * dot / width",
        ("tests/test_ops.py",),
        "Wrong sign in the derivative of (sum x)^2 / d: d/dx_i gives +2 sum x, not -2 sum x.",
    ),
    Mutant(
        "norms-opmath-no-upcast",
        "rewriter/ops/norms.py",
        "    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x",
        "    return x",
        ("tests/test_ops.py",),
        "Wrong computation dtype: half inputs are normalized in half precision, where the sum "
        "of squares overflows float16 and rounds differently from the float32 opmath.",
    ),
    Mutant(
        "l1-norm-backward-drops-centering-projection",
        "rewriter/ops/norms.py",
        "    grad_x = grad_d - grad_d.mean(-1, keepdim=True) if centered else grad_d",
        "    grad_x = grad_d",
        ("tests/test_quant_ops.py",),
        "Dropped term: with centering, the gradient must be projected onto zero-mean vectors "
        "(the transpose of x - mean(x)); forgetting it breaks gradcheck.",
    ),
    # === canonicalize, the weight store, ShiftQuant and l1quant ==================================
    # --- rewriter/analysis/canonicalize.py: norm recognition ------------------------------------------------
    Mutant(
        "canon-var-any-correction",
        "rewriter/analysis/canonicalize.py",
        "    P.call(aten.var.correction, x, dims, correction=0, keepdim=True),\n",
        "    P.call(aten.var.correction, x, dims, keepdim=True),\n",
        ("tests/test_canonicalize.py",),
        "The variance alternative stops requiring correction=0, so an unbiased x.var() (correction=1) "
        "is recognised as LayerNorm; an easy slip when writing the pattern (only the kwarg's presence "
        "seems to matter); the NearMisses 'unbiased' form should catch it.",
    ),
    Mutant(
        "canon-rms-no-eps-alternative",
        "rewriter/analysis/canonicalize.py",
        '    rule(P.call(aten.mul.Tensor, x, P.call(aten.rsqrt.default, P.call(aten.add.Tensor, _mean_square, eps)), commutative=True), normalize_rms, name="recognize-rms-norm", where=norm_is_last_dim),  # x * rsqrt(mean(x^2) + eps) -> rms_norm(x)  # noqa: E501\n',
        '    rule(P.call(aten.mul.Tensor, x, P.call(aten.rsqrt.default, P.call(aten.add.Tensor, _mean_square, eps)), commutative=True), normalize_rms, name="recognize-rms-norm", where=norm_is_last_dim),  # x * rsqrt(mean(x^2) + eps) -> rms_norm(x)  # noqa: E501\n'
        '    rule(P.call(aten.mul.Tensor, x, P.call(aten.rsqrt.default, _mean_square), commutative=True), lambda x: normalize_rms(x, 1e-6), name="recognize-rms-norm-no-eps", where=norm_is_last_dim),  # x * rsqrt(mean(x^2)) -> rms_norm(x, eps=1e-6)  # noqa: E501\n',
        ("tests/test_canonicalize.py",),
        "An extra alternative recognises x * rsqrt(mean(x^2)) with no eps as RMSNorm with a made-up "
        "eps of 1e-6 (someone 'generalising' the rule to more models); values change (all-zero rows "
        "become 0 instead of nan/inf); NearMisses has no eps-free form, so this may survive.",
    ),
    Mutant(
        "canon-norm-is-last-dim-any-dim",
        "rewriter/analysis/canonicalize.py",
        '    return _last_dim_reduction(match) and _norm_width(match["x"]) is not None\n',
        '    return _norm_width(match["x"]) is not None\n',
        ("tests/test_canonicalize.py",),
        "The norm_is_last_dim guard only checks that the last dim has a static width and forgets "
        "to check that the reduction runs over it, so a mean over the batch dim becomes rms_norm "
        "(NearMisses 'over_batch').",
    ),
    Mutant(
        "canon-last-dim-no-modulo",
        "rewriter/analysis/canonicalize.py",
        "    return isinstance(x, torch.Tensor) and len(dims) == 1 and dims[0] % x.dim() == x.dim() - 1\n",
        "    return isinstance(x, torch.Tensor) and len(dims) == 1 and dims[0] == x.dim() - 1\n",
        ("tests/test_canonicalize.py", "tests/test_fold_ln.py", "tests/test_l1quant.py"),
        "The last-dim check compares the raw dim without normalising negatives, so mean(-1) (what "
        "every traced norm uses) is never recognised: written-out RMSNorm/LayerNorm stay decomposed.",
    ),
    Mutant(
        "canon-square-any-power",
        "rewriter/analysis/canonicalize.py",
        "_square = P.call(aten.pow.Tensor_Scalar, x, 2) | P.call(aten.mul.Tensor, x, x)\n",
        "_square = P.call(aten.pow.Tensor_Scalar, x, P.const()) | P.call(aten.mul.Tensor, x, x)\n",
        ("tests/test_canonicalize.py",),
        "The square accepts any exponent, so x * rsqrt(mean(x^p) + eps) is taken for RMSNorm; the "
        "'cubed' near miss puts abs() between pow and mean, so it may not catch this (guard too wide).",
    ),
    Mutant(
        "canon-weight-vector-trailing-dim-only",
        "rewriter/analysis/canonicalize.py",
        "        and tuple(val.shape) == (width,)\n",
        "        and val.shape[-1] == width\n",
        ("tests/test_canonicalize.py",),
        "_is_vector_of checks only the trailing dim, so a [T, d] multiplier is absorbed as a norm "
        "weight (NearMisses 'broadcast_weight' asserts absorb-rms-norm-weight never fires).",
    ),
    Mutant(
        "canon-rms-weight-absorbed-in-half",
        "rewriter/analysis/canonicalize.py",
        "    return weight_fits_norm(match) and _val(x).dtype in (torch.float32, torch.float64)\n",
        "    return weight_fits_norm(match) and _val(x).dtype.is_floating_point\n",
        ("tests/test_canonicalize.py",),
        "The RMS weight guard lets float16/bfloat16 through, so Llama's separate post-cast weight "
        "multiply is absorbed into rms_norm and rounds once instead of twice (half-precision test "
        "asserts absorb-rms-norm-weight never fires and logits are bit-equal).",
    ),
    Mutant(
        "canon-casts-round-trip-any-float",
        "rewriter/analysis/canonicalize.py",
        "        and y.dtype in (torch.float16, torch.bfloat16)\n",
        "        and y.dtype.is_floating_point\n",
        ("tests/test_canonicalize.py",),
        "casts_round_trip accepts any float y, so a float64 model's to(f32)/rms_norm/to(f64) is "
        "folded into a float64 rms_norm, changing values (test_equivalent_in_float64's 1e-10 bound).",
    ),
    Mutant(
        "canon-fold-casts-drops-eps",
        "rewriter/analysis/canonicalize.py",
        "    return emit(aten.rms_norm.default, y, norm.args[1], None, norm.args[3])\n",
        "    return emit(aten.rms_norm.default, y, norm.args[1], None)\n",
        ("tests/test_canonicalize.py",),
        "Folding the casts re-emits rms_norm without its eps, so the default (float32 machine eps) "
        "replaces Llama's 1e-6; the half-precision test compares logits bit for bit.",
    ),
    Mutant(
        "canon-bias-absorb-drops-weight",
        "rewriter/analysis/canonicalize.py",
        "    return emit(aten.layer_norm.default, norm.args[0], norm.args[1], norm.args[2], b, norm.args[4])\n",
        "    return emit(aten.layer_norm.default, norm.args[0], norm.args[1], None, b, norm.args[4])\n",
        ("tests/test_canonicalize.py",),
        "absorb_layer_bias copied from the no-affine template passes None for the weight, silently "
        "dropping a gamma absorbed a step earlier (golden graph and equivalence check).",
    ),
    Mutant(
        "canon-noop-cast-ignores-dtype",
        "rewriter/analysis/canonicalize.py",
        '    return _same_shape(match.root, match["x"]) and _same_type(match.root, match["x"])\n',
        '    return _same_shape(match.root, match["x"])\n',
        ("tests/test_canonicalize.py", "tests/test_fold_ln.py", "tests/test_l1quant.py"),
        "same_value_type only compares shapes, so dtype-changing casts (half->float32 upcasts, "
        "bool mask->float) of the same shape are dropped as no-ops.",
    ),
    # --- rewriter/analysis/canonicalize.py: attention ---------------------------------------------------------
    Mutant(
        "canon-bloom-scale-from-beta",
        "rewriter/analysis/canonicalize.py",
        '    alpha = float(scores.kwargs.get("alpha", 1.0))\n',
        '    alpha = float(scores.kwargs.get("beta", 1.0))\n',
        ("tests/test_canonicalize.py", "tests/test_linearize.py"),
        "BLOOM's SDPA scale is read from baddbmm's beta (always 1) instead of alpha "
        "(1/sqrt(head_dim)): a plausible mix-up of baddbmm's two scalars; attention becomes unscaled.",
    ),
    Mutant(
        "canon-bloom-bias-axes-swapped",
        "rewriter/analysis/canonicalize.py",
        "    bias4 = emit(aten.view.default, bias, [batch, heads, 1, -1])\n",
        "    bias4 = emit(aten.view.default, bias, [heads, batch, 1, -1])\n",
        ("tests/test_canonicalize.py", "tests/test_linearize.py"),
        "The ALiBi bias [B*H, 1, S] is viewed with batch and heads swapped (wrong axis order), so "
        "heads get other heads' slopes, or the mask fails to broadcast.",
    ),
    # --- rewriter/ir/store.py ----------------------------------------------------------------------------
    Mutant(
        "store-row-blocks-skips-last-row",
        "rewriter/ir/store.py",
        "    for start in range(0, rows, step):\n",
        "    for start in range(0, rows - 1, step):\n",
        ("tests/test_row_blocks.py", "tests/test_store.py"),
        "Off-by-one in the row-block loop: range stops at rows - 1, so when blocks are one row (or "
        "rows - 1 is a multiple of the step) the last block is never computed: its rows stay "
        "torch.empty garbage and column sums miss them.",
    ),
    Mutant(
        "store-row-blocks-inclusive-stop",
        "rewriter/ir/store.py",
        "        yield start, min(rows, start + step)\n",
        "        yield start, min(rows, start + step - 1)\n",
        (
            "tests/test_row_blocks.py",
            "tests/test_store.py",
            "tests/test_fold_ln.py",
            "tests/test_prernorm.py",
            "tests/test_stream.py",
        ),
        "Treating the block's stop as inclusive: every block is one row short, so one row per block "
        "is never written (and streamed tensors are written short).",
    ),
    Mutant(
        "store-column-sum-overwrites",
        "rewriter/ir/store.py",
        "                total += rows.sum(0)\n",
        "                total = rows.sum(0)\n",
        ("tests/test_row_blocks.py", "tests/test_store.py"),
        "The blockwise column sum assigns instead of accumulating, so only the last block counts; "
        "invisible with one block, wrong as soon as a weight spans several (block-size test).",
    ),
    Mutant(
        "store-write-ignores-aliases",
        "rewriter/ir/store.py",
        "        for alias in self.aliases(name) if name in self else [name]:\n",
        "        for alias in [name]:\n",
        ("tests/test_store.py", "tests/test_fold_ln.py", "tests/test_stream.py"),
        "Writes bind only the named tensor, not the other names tied to it, so a tied head and "
        "embedding silently come apart after an edit.",
    ),
    # --- rewriter/ops/quant.py --------------------------------------------------------------------------
    Mutant(
        "quant-pack-nibble-order-swapped",
        "rewriter/ops/quant.py",
        "        shifts = (2 ** (bits * torch.arange(per, dtype=torch.int32, device=device))).to(torch.int32)\n",
        "        shifts = (2 ** (bits * torch.arange(per - 1, -1, -1, dtype=torch.int32, device=device))).to(torch.int32)\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "Packing puts the first code in the high bits (big-endian nibbles), the common mistake "
        "against MatMulNBits' low-bits-first layout; unpack no longer inverts pack.",
    ),
    Mutant(
        "quant-unpack-odd-bits-msb-first",
        "rewriter/ops/quant.py",
        "    return (per_code * _powers([2**i for i in range(bits)], device)).sum(-1)\n",
        "    return (per_code * _powers([2 ** (bits - 1 - i) for i in range(bits)], device)).sum(-1)\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "For 3/5/6/7 bits, unpack reassembles each code's bits most-significant first while pack "
        "wrote them least-significant first (bit order reversed within a code).",
    ),
    Mutant(
        "quant-dequantize-zero-point-is-qmax",
        "rewriter/ops/quant.py",
        "    codes = unpack(packed, bits) - 2 ** (bits - 1)  # [N, groups, group]\n",
        "    codes = unpack(packed, bits) - qmax(bits)  # [N, groups, group]\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "Dequantize subtracts qmax (2^(b-1) - 1) instead of the zero point 2^(b-1): every weight is "
        "shifted by one step (zero groups no longer dequantize to zero).",
    ),
    Mutant(
        "quant-code-offset-off-by-one",
        "rewriter/ops/quant.py",
        "        codes = (best_q + 2 ** (bits - 1)).to(torch.int32)\n",
        "        codes = (best_q + 2 ** (bits - 1) - 1).to(torch.int32)\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "The stored unsigned code uses qmax as offset, one below the zero point dequantize "
        "subtracts, so all weights read back one step low.",
    ),
    Mutant(
        "quant-group-count-off-by-one",
        "rewriter/ops/quant.py",
        "    rows, cols = weight.shape\n    groups = -(-cols // group)\n    packed = torch.empty(",
        "    rows, cols = weight.shape\n    groups = cols // group + 1\n    packed = torch.empty(",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "Ceil division written as floor + 1: one extra all-padding group whenever K is a multiple "
        "of the group size.",
    ),
    Mutant(
        "quant-ceil-log2-le",
        "rewriter/ops/quant.py",
        "    return nearest + (torch.exp2(nearest) < ratio).to(nearest.dtype)\n",
        "    return nearest + (torch.exp2(nearest) <= ratio).to(nearest.dtype)\n",
        ("tests/test_quant_ops.py",),
        "The ceil correction uses <=, so exact powers of two get a scale twice too large (wastes a "
        "bit; test_ceil_log2_is_exact's 2^(e-1) < r bound).",
    ),
    Mutant(
        "quant-act-scale-uses-zero-point",
        "rewriter/ops/quant.py",
        "    exponent = ceil_log2(safe / top).clamp(*EXPONENT_RANGE)\n",
        "    exponent = ceil_log2(safe / 2 ** (bits - 1)).clamp(*EXPONENT_RANGE)\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "Activation scale computed from 2^(b-1) instead of qmax: sometimes a power of two too "
        "small, so the largest value of a token clips.",
    ),
    Mutant(
        "quant-scale-search-off-by-one",
        "rewriter/ops/quant.py",
        "        for shift in range(search + 1):\n",
        "        for shift in range(search):\n",
        ("tests/test_quant_ops.py", "tests/test_l1quant.py"),
        "The scale search tries e0..e0-3 instead of e0..e0-search (range end off by one); results "
        "stay valid, only slightly worse, so it may survive unless a test pins search's depth.",
    ),
    # --- passes/l1quant.py ------------------------------------------------------------------------------
    Mutant(
        "l1q-bytes-after-omits-exponents",
        "passes/l1quant.py",
        '        "bytes_after": packed.numel() + exponents.numel(),\n',
        '        "bytes_after": packed.numel(),\n',
        ("tests/test_l1quant.py",),
        "The per-layer storage report forgets the int8 exponent per group (test compares with "
        "quant.storage_bytes).",
    ),
    Mutant(
        "l1q-calibrated-factor-inverted",
        "passes/l1quant.py",
        "        return {name: square / linear for name, (square, linear) in sums.items()}\n",
        "        return {name: linear / square for name, (square, linear) in sums.items()}\n",
        ("tests/test_l1quant.py",),
        "The calibrated constant c = sum r^2 / sum r is written upside down, giving ~1/c (< 1); "
        "the test asserts every calibrated factor > 1.",
    ),
    Mutant(
        "l1q-eps-not-square-rooted",
        "passes/l1quant.py",
        "            math.sqrt(eps),\n",
        "            eps,\n",
        ("tests/test_l1quant.py",),
        "The L1 norm gets eps instead of sqrt(eps) as its additive floor (l1_norm adds it to "
        "c*mean|d|, not under a root), so near-zero rows are scaled differently from LayerNorm; "
        "tiny numerically, may survive.",
    ),
    # === adapter init, merge and unmerge; vocabulary trimming ====================================
    # ------------------------------------------------------------------------------------------
    # Adapter merge / unmerge (rewriter/analysis/adapters.py, passes/merge_adapters.py)
    # ------------------------------------------------------------------------------------------
    Mutant(
        "merge-b-rows-from-row-zero",
        "rewriter/analysis/adapters.py",
        "            return rows + left[block.start : block.stop] @ right",
        "            return rows + left[: block.stop - block.start] @ right",
        (
            "tests/test_row_blocks.py",
            "tests/test_adapters.py",
            "tests/test_stream.py",
            "tests/test_deploy.py",
        ),
        "LoRA merge of an (out, in) weight takes B's rows for every row block from row 0 (sliced by "
        "block length, not block position): right for the first block, wrong for every later one; "
        "a classic slip when porting a whole-tensor merge to the blocked store.",
    ),
    Mutant(
        "merge-layout-inverted",
        "rewriter/analysis/adapters.py",
        '        if record.layout == "out_in":\n            return rows + left',
        '        if record.layout == "in_out":\n            return rows + left',
        (
            "tests/test_row_blocks.py",
            "tests/test_adapters.py",
            "tests/test_stream.py",
            "tests/test_deploy.py",
        ),
        "The merge handles the two weight layouts the wrong way round (Conv1D's (in, out) weight gets "
        "B A instead of (B A)^T): a layout-flag mix-up, silent on square maps, wrong or a shape "
        "error on the rest.",
    ),
    Mutant(
        "merge-drops-scale",
        "rewriter/analysis/adapters.py",
        '    left = record.scale * f["B"]  # [out, r]',
        '    left = f["B"]  # [out, r]',
        ("tests/test_row_blocks.py", "tests/test_adapters.py", "tests/test_deploy.py"),
        "Merge adds B R A without the alpha/r scale that the branch applies: invisible whenever "
        "alpha == r (the default 8/8), wrong for any other rank.",
    ),
    Mutant(
        "merge-r-transposed",
        "rewriter/analysis/adapters.py",
        '    right = f["R"] @ f["A"] if "R" in f else f["A"]  # [r, in]',
        '    right = f["R"].T @ f["A"] if "R" in f else f["A"]  # [r, in]',
        ("tests/test_row_blocks.py", "tests/test_adapters.py"),
        "LoRA-XS / LoRA-SB core merged as R^T: the branch is linear(h, R) = h R^T, and confusing "
        "that with the weight form B R A transposes the trained core (LoRA-SB's diagonal init "
        "hides it until R trains).",
    ),
    Mutant(
        "merge-replaces-first-application-only",
        "passes/merge_adapters.py",
        "            for total in totals:\n                rw.replace(total, total.args[0]",
        "            for total in totals[:1]:\n                rw.replace(total, total.args[0]",
        ("tests/test_adapters.py", "tests/test_deploy.py"),
        "Merge removes the branch only at the first application of a shared module: the second "
        "application (a reused layer, the decode half of a step graph) adds s B A on top of the "
        "already merged weight.",
    ),
    Mutant(
        "merge-tie-check-inverted",
        "passes/merge_adapters.py",
        "            if lin is not None and lin.weight_name == weight:",
        "            if lin is not None and lin.weight_name != weight:",
        ("tests/test_adapters.py",),
        "Merge never unties a tied weight before writing W + s B A (condition inverted), so an "
        "adapter on a tied LM head also moves the embedding table: a tie missed.",
    ),
    Mutant(
        "keep-base-snapshot-after-merge",
        "passes/merge_adapters.py",
        """            if self.keep_base:
                factors = {
                    role: rw.store.read(name).detach().clone()
                    for role, name in record.tensors.items()
                }
                original = rw.store.read(weight).detach().clone()
                kept.append(MergedAdapter(record, weight, original, factors))
            rw.apply(merge_edit(gm, record, weight))
""",
        """            rw.apply(merge_edit(gm, record, weight))
            if self.keep_base:
                factors = {
                    role: rw.store.read(name).detach().clone()
                    for role, name in record.tensors.items()
                }
                original = rw.store.read(weight).detach().clone()
                kept.append(MergedAdapter(record, weight, original, factors))
""",
        ("tests/test_adapters.py",),
        "keep_base snapshots the weight after the merge instead of before, so unmerge restores "
        "W + s B A and re-adds the branch on top (the delta counted twice after unmerging).",
    ),
    Mutant(
        "nola-merge-b-from-alpha",
        "rewriter/analysis/adapters.py",
        '                "B": Combination("k,kor->or", "beta", "B_basis"),',
        '                "B": Combination("k,kor->or", "alpha", "B_basis"),',
        ("tests/test_row_blocks.py", "tests/test_adapters.py", "tests/test_deploy.py"),
        "Copy-paste in NOLA's kind entry: B is combined with A's coefficients alpha instead of "
        "beta (shapes agree whenever k == l, so nothing fails loudly; the graph branch and the "
        "merge read the same entry, so the adapter is no longer a no-op at init).",
    ),
    Mutant(
        "nola-load-bases-in-out-swapped",
        "rewriter/analysis/adapters.py",
        "        lin.in_features,\n        lin.out_features,\n    )",
        "        lin.out_features,\n        lin.in_features,\n    )",
        ("tests/test_adapters.py",),
        "Loading a NOLA checkpoint regenerates the bases with in/out features swapped (argument "
        "order slip), giving bases of the wrong shape for every non-square map.",
    ),
    Mutant(
        "save-only-trainable-factors",
        "rewriter/analysis/adapters.py",
        "        roles = [r for r in record.tensors if r not in regenerated]",
        "        roles = [r for r in record.tensors if record.tensors[r] in record.trainable]",
        ("tests/test_adapters.py", "tests/test_stream.py"),
        "The adapter checkpoint stores only trained tensors, dropping LoRA-XS's frozen singular "
        "vectors A and B that cannot be recomputed from the base model.",
    ),
    Mutant(
        "inject-first-application-only",
        "rewriter/analysis/adapters.py",
        "    apps = applications(rw.gm, lin)\n    first = apps[0].output",
        "    apps = [lin]\n    first = apps[0].output",
        ("tests/test_adapters.py", "tests/test_deploy.py"),
        "A module applied more than once gets the adapter branch at only one application (the "
        "linear map that was selected), so the shared layer / step-graph halves disagree.",
    ),
    # ------------------------------------------------------------------------------------------
    # Adapter init (passes/lora.py, nola.py, lora_xs.py, lora_sb.py)
    # ------------------------------------------------------------------------------------------
    Mutant(
        "lora-rslora-scale-swapped",
        "passes/lora.py",
        "        scale = self.alpha / (math.sqrt(self.r) if self.rslora else self.r)",
        "        scale = self.alpha / (self.r if self.rslora else math.sqrt(self.r))",
        ("tests/test_adapters.py",),
        "The plain and rank-stabilized scales are swapped (alpha/sqrt(r) by default instead of "
        "PEFT's alpha/r), so the merged weights stop matching PEFT's merge_and_unload.",
    ),
    Mutant(
        "pissa-residual-added",
        "passes/lora.py",
        "        return rows - part[block.start : block.stop]",
        "        return rows + part[block.start : block.stop]",
        ("tests/test_adapters.py",),
        "PiSSA's residual adds s B A to the base instead of subtracting it, so the model is no "
        "longer unchanged at init (W + 2 s B A).",
    ),
    Mutant(
        "pissa-residual-ignores-layout",
        "passes/lora.py",
        '        part = principal if lin.layout == "out_in" else principal.T',
        "        part = principal",
        ("tests/test_adapters.py",),
        "PiSSA subtracts the (out, in) principal part from a Conv1D weight stored (in, out) "
        "without transposing it.",
    ),
    Mutant(
        "pissa-untie-after-residual",
        "passes/lora.py",
        """            if self.init == "pissa":
                lin = own_weight(rw, lin)  # the residual must not reach a tied embedding
            a, b = self._factors(rw, lin, scale, ctx.seed + index)
""",
        """            a, b = self._factors(rw, lin, scale, ctx.seed + index)
            if self.init == "pissa":
                lin = own_weight(rw, lin)  # the residual must not reach a tied embedding
""",
        ("tests/test_adapters.py",),
        "The tied LM head is untied only after PiSSA has written the residual W - s B A, which "
        "already went into the shared tensor: the embedding table is corrupted (a tie missed).",
    ),
    Mutant(
        "lora-xs-svd-ignores-layout",
        "passes/lora_xs.py",
        '    return weight if lin.layout == "out_in" else weight.T',
        "    return weight",
        ("tests/test_adapters.py",),
        "LoRA-XS takes the SVD of a Conv1D weight in its stored (in, out) form, so U and V^T come "
        "out swapped relative to the (out, in) factors the branch needs.",
    ),
    Mutant(
        "lora-sb-gradient-layout-swapped",
        "passes/lora_sb.py",
        '            g = g if lin.layout == "out_in" else g.T',
        '            g = g.T if lin.layout == "out_in" else g',
        ("tests/test_adapters.py",),
        "LoRA-SB transposes the gradient for the wrong layout, so the estimated update (and its "
        "singular vectors) are (in, out) for nn.Linear and (in, out) again for Conv1D.",
    ),
    # ------------------------------------------------------------------------------------------
    # Vocabulary trimming: graph side (passes/vocab_trim.py)
    # ------------------------------------------------------------------------------------------
    Mutant(
        "vocab-padding-idx-not-renumbered",
        "passes/vocab_trim.py",
        "            if lookup.target == aten.embedding.default and len(lookup.args) > 2:",
        "            if lookup.target == aten.embedding.default and len(lookup.args) > 3:",
        ("tests/test_vocab_trim.py",),
        "Off-by-one in the arg count: aten.embedding(weight, ids, padding_idx) has 3 args, so the "
        "padding_idx is never renumbered and keeps the old id (pointing at the wrong row, or past "
        "the end, of the trimmed table).",
    ),
    Mutant(
        "vocab-id-map-fallback-row-not-translated",
        "passes/vocab_trim.py",
        "        filler = int(position[_filler_row(rows, tokenizer, previous)])",
        "        filler = int(_filler_row(rows, tokenizer, previous))",
        ("tests/test_vocab_trim.py", "tests/test_stream.py"),
        "id-map mode: removed/unknown ids are mapped to the filler's row in the OLD table (its "
        "original id) instead of its row in the trimmed table, so they read an unrelated row or "
        "index past the end.",
    ),
    Mutant(
        "vocab-id-comparison-uses-inverse-map",
        "passes/vocab_trim.py",
        "                new = int(position[value]) if 0 <= value < use.size else -1",
        "                new = int(rows[value]) if 0 <= value < rows.numel() else -1",
        ("tests/test_vocab_trim.py",),
        "`ids == pad_id` comparisons are renumbered with kept[] (new -> old) instead of "
        "position[] (old -> new): the classic inverse-map confusion.",
    ),
    Mutant(
        "vocab-tied-table-sliced-twice",
        "passes/vocab_trim.py",
        "            written.update(rw.store.aliases(tensor.name))",
        "            written.add(tensor.name)",
        ("tests/test_vocab_trim.py", "tests/test_stream.py"),
        "A tie by name is missed: a tied embedding/head reached under both names is sliced once "
        "per name, the second slice gathering original ids out of an already-trimmed table.",
    ),
    Mutant(
        "vocab-min-freq-off-by-one",
        "passes/vocab_trim.py",
        "        mined = [i for i, c in counts.most_common() if c >= self.min_freq]",
        "        mined = [i for i, c in counts.most_common() if c > self.min_freq]",
        ("tests/test_vocab_trim.py", "tests/test_deploy.py"),
        "Off-by-one in the keep set: ids used exactly min_freq times (every id seen once, by "
        "default) are dropped.",
    ),
    Mutant(
        "vocab-config-id-zero-dropped",
        "passes/vocab_trim.py",
        "        found += [v for v in values if isinstance(v, int) and v >= 0]",
        "        found += [v for v in values if isinstance(v, int) and v > 0]",
        ("tests/test_vocab_trim.py",),
        "Config special ids equal to 0 (bos/eos/pad = 0 is common) are treated as unset and not "
        "kept, so the config names a removed token.",
    ),
    Mutant(
        "vocab-id-map-compose-drops-row-zero",
        "passes/vocab_trim.py",
        "    return rows[rows >= 0].unique(sorted=True)",
        "    return rows[rows > 0].unique(sorted=True)",
        ("tests/test_vocab_trim.py",),
        "Trimming an id-map graph again filters removed ids with > 0 instead of >= 0, dropping "
        "the kept id that sits in row 0 (off-by-one in kept ids).",
    ),
    # ------------------------------------------------------------------------------------------
    # Vocabulary trimming: tokenizer and config side (rewriter/io/tokenizer_trim.py)
    # ------------------------------------------------------------------------------------------
    Mutant(
        "config-pad-token-id-not-renumbered",
        "rewriter/io/tokenizer_trim.py",
        '    "eos_token_id",\n    "pad_token_id",\n',
        '    "eos_token_id",\n',
        ("tests/test_tokenizer_trim.py", "tests/test_vocab_trim.py"),
        "pad_token_id missing from the config id fields: the pad id is neither kept nor "
        "renumbered, so the saved config names the old id.",
    ),
    Mutant(
        "config-vocab-size-from-old-ids",
        "rewriter/io/tokenizer_trim.py",
        '        out["vocab_size"] = size',
        '        out["vocab_size"] = max(old_to_new, default=-1) + 1',
        ("tests/test_tokenizer_trim.py", "tests/test_vocab_trim.py"),
        "vocab_size computed from the highest kept OLD id + 1 instead of the number of kept ids, "
        "so the config disagrees with the trimmed tables.",
    ),
    Mutant(
        "config-old-to-new-swapped",
        "rewriter/io/tokenizer_trim.py",
        "    old_to_new = {int(old): new for new, old in enumerate(kept)}",
        "    old_to_new = {int(old): new for old, new in enumerate(kept)}",
        ("tests/test_tokenizer_trim.py", "tests/test_vocab_trim.py", "tests/test_deploy.py"),
        "The config's old -> new id map is built the wrong way round (new -> old), so special "
        "ids are renumbered wrongly or refused.",
    ),
    Mutant(
        "config-suppress-tokens-not-renumbered",
        "rewriter/io/tokenizer_trim.py",
        "            out[field] = [old_to_new[v] for v in out[field] if v in old_to_new]",
        "            out[field] = [v for v in out[field] if v in old_to_new]",
        ("tests/test_tokenizer_trim.py",),
        "suppress_tokens lists drop removed ids but keep the survivors' old ids: a config field "
        "not renumbered.",
    ),
    Mutant(
        "tokenizer-added-token-new-id-zero-dropped",
        "rewriter/io/tokenizer_trim.py",
        '        if old_to_new[entry["id"]] >= 0',
        '        if old_to_new[entry["id"]] > 0',
        ("tests/test_tokenizer_trim.py", "tests/test_vocab_trim.py"),
        "Off-by-one in the kept-id test: the added/special token that lands on new id 0 "
        "(<|endoftext|>, [PAD]) is dropped from added_tokens and stops being special.",
    ),
    Mutant(
        "tokenizer-post-processor-not-remapped",
        "rewriter/io/tokenizer_trim.py",
        '    spec["post_processor"] = _map_post_processor(spec.get("post_processor"), remap)',
        '    spec["post_processor"] = spec.get("post_processor")',
        ("tests/test_tokenizer_trim.py", "tests/test_vocab_trim.py"),
        "The rebuilt tokenizer keeps the post-processor's old special-token ids ([CLS]/[SEP], "
        "<s>/</s>), so encodings with special tokens use stale ids.",
    ),
]
