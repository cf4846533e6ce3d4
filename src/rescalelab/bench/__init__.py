"""``rescalelab-bench``: side-by-side benchmarks, interleaved in one process, reported as median ratios.

Every comparison runs its variants in the same process, after a warm-up, interleaved
(A B C, C B A, A B C, ... — alternating order cancels slow drifts of the machine), and reports the
median time per step of each variant and the median of the *per-round ratios* with its
interquartile range. Ratios measured this way are stable on noisy machines where absolute times
are not. Rows:

1. ``framework``: a full rescalelab fit (Lightning loop, progress bar, MLflow logger, default
   callbacks) versus a bare PyTorch loop, same model, data tensors, batch, optimizer and steps;
   and Lightning alone (a stripped ``Trainer.fit`` of the same work): Lightning's own floor.
2. ``norm (<model>, ...)``: one training step (forward, backward, optimizer step) with norm
   none, bn and whitening at its default (statistics every step): small_cnn and resnet20 at
   batch 128, 32 px, AlexNet at batch 32, 64 and 224 px; on CUDA each in fp32 and bf16.
3. ``drift``: a fit with the drift callback at its default schedule versus without.
   ``stepsizes``: a whitening fit with the effective-stepsize callback versus without.
4. ``logging``: a fit with the MLflow logger versus ``logger=False``.
5. ``data/<pipeline>``: images/s a pipeline delivers versus images/s a training step consumes.
6. ``gpu``: bf16 autocast and ``torch.compile`` variants of the bare loop (on a CPU only when
   asked for with ``--rows gpu``).
7. ``baselines/<model>``: one training step of each comparison norm (with SGD) and optimizer
   (AdamW, SOAP, Muon, Nesterov SGD; no norm) against none + SGD, on small_cnn and resnet20.
8. ``train_eval``: a fit with ``callbacks=train_eval`` (the eval-mode pass over the training set
   at every epoch end) versus ``callbacks=default``, and with ``data.train_eval_size=1024``.

One job a module: :mod:`~rescalelab.bench.timing` (interleaving, ratios, the fit clock),
:mod:`~rescalelab.bench.steps` (training steps without Lightning), :mod:`~rescalelab.bench.fits`
(Lightning and rescalelab fits), the rows (:mod:`~rescalelab.bench.norm_rows`,
:mod:`~rescalelab.bench.framework_rows`, :mod:`~rescalelab.bench.callback_rows`,
:mod:`~rescalelab.bench.data`) and the command line (:mod:`~rescalelab.bench.cli`).
"""
