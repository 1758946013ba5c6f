"""The workbench that trains and evaluates AMIR, apart from the inference product.

`sources` (real anatomy from the package registries), `simulate` (degradation protocol v1),
`paired` (splits, paired sets, fresh and augmented pairs, paired-folder reading), `metrics` (the
official PSNR / SSIM / RMSE), `training` (`medir-fast train`), `evaluate` (`medir-fast eval`)
and `ship_weights` (putting a trained model into the package). It uses the product
(`medir_fast.model`, `restorer`, ...); the product never imports it.
"""
