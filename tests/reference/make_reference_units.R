# Reference numbers from lme4 for tests/test_reference_units.py (issue 9): formula functions, collinear
# covariates, awkward units and a singular fit that lme4 keeps.
#
# Run from the repository root:   Rscript tests/reference/make_reference_units.R
# Needs R with lme4, nlme, minqa (an lme4 dependency), splines (base R) and jsonlite. About 10 seconds.
#
# What it does:
#   1. exports public data sets that tests/reference/make_reference.R does not use (nlme::Oxboys,
#      nlme::BodyWeight, nlme::IGF, datasets::CO2, lme4::sleepstudy with its unit variants) and two
#      simulations with fixed seeds (a seasonal study, a study with an exactly collinear covariate) to
#      tests/reference/data/*.csv, factors as plain text;
#   2. reads every data set back from its CSV, so R fits exactly the numbers that Python reads;
#   3. fits the cases below with lmer() and default lmerControl() and writes
#      tests/reference/lme4_reference_units.json. Nothing is rounded.
#
# Conventions (as make_reference.R): the `factors` columns become factor(as.character(x)) under the C
# collation, every other column stays numeric; df = attr(logLik(fit), "df") = fixed effects + theta + 1;
# BIC uses n = rows. A `factor(x)` inside a formula is R's: levels of the numeric x in numeric order.
#
# The awkward-units section records two things per (transform, candidate):
#   lme4  = what lmer() does on the transformed data (its logLik, or the error text when it fails, and
#           every warning and message);
#   right = the mathematically right answer, derived from a well-conditioned fit in the original units.
#           Every fixed-effect column change x' = a x + b and every outcome change y' = c y + d leave a
#           model with an intercept and a correlated random slope (or a random intercept only) the same
#           model, so logLik' = logLik - n ln|c|, beta' = M beta (+ d on the intercept) and
#           vcov' = M vcov M' with M the exact linear map. An uncorrelated `(x || g)` slope is invariant to
#           the scale a only: after a shift b it is a different model (a correlated random effect in the
#           original units with a constrained covariance), whose optimum is found here by optimizing
#           that constrained covariance with the original-units deviance function (see
#           shifted_uncorrelated()); for those cases only logLik and the SDs are recorded.

suppressPackageStartupMessages({
  library(lme4)
  library(splines)
  library(jsonlite)
})

invisible(Sys.setlocale("LC_COLLATE", "C"))

source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

# ------------------------------------------------------------------------------ data

simulate_seasonal <- function() {
  # 60 subjects seen about every 3 months for up to 10 years (visit times jittered, 20% of later visits
  # missing), yearly seasonal cycle, arm per subject, correlated random intercept and slope.
  set.seed(901)
  ids <- sprintf("s%02d", 1:60)
  grid <- expand.grid(visit = 0:40, id = ids, stringsAsFactors = FALSE)
  i <- match(grid$id, ids)
  grid$t <- round(grid$visit / 4 + runif(nrow(grid), 0, 0.08), 3)
  grid$arm <- rep(c("control", "treatment"), length.out = length(ids))[i]
  z1 <- rnorm(length(ids))
  z2 <- rnorm(length(ids))
  grid$y <- round(20 + 2 * sin(2 * pi * grid$t) - 1.2 * cos(2 * pi * grid$t) + 0.4 * grid$t -
                    0.15 * grid$t * (grid$arm == "treatment") + 3 * z1[i] +
                    0.3 * (0.4 * z1[i] + sqrt(1 - 0.4^2) * z2[i]) * grid$t + rnorm(nrow(grid), 0, 1), 3)
  keep <- grid$visit == 0 | runif(nrow(grid)) > 0.2
  grid[keep, c("id", "arm", "t", "y")]
}

simulate_collinear <- function() {
  # 40 subjects x 5 visits; x1 a visit-level covariate, x2 = 2 x1 + 3 exactly (the same quantity in other
  # units), treated = 1 for the treatment arm (the arm factor again), x1_big and x2_big the pair in units
  # 1e8 times larger.
  set.seed(902)
  ids <- sprintf("c%02d", 1:40)
  grid <- expand.grid(t = 0:4, id = ids, stringsAsFactors = FALSE)
  i <- match(grid$id, ids)
  grid$arm <- rep(c("control", "treatment"), length.out = length(ids))[i]
  grid$treated <- as.numeric(grid$arm == "treatment")
  grid$x1 <- round(rnorm(nrow(grid), 5, 2), 2)
  grid$x2 <- 2 * grid$x1 + 3
  grid$x1_big <- grid$x1 * 1e8
  grid$x2_big <- 2 * grid$x1_big + 3
  grid$y <- round(10 + 0.8 * grid$t + 0.5 * grid$x1 + 1.5 * grid$treated + rnorm(length(ids), 0, 2)[i] +
                    rnorm(length(ids), 0, 0.3)[i] * grid$t + rnorm(nrow(grid), 0, 1), 3)
  grid[, c("id", "arm", "treated", "t", "x1", "x2", "x1_big", "x2_big", "y")]
}

sleep <- as_plain(lme4::sleepstudy, c("Subject", "Days", "Reaction"))
bodyweight <- as_plain(nlme::BodyWeight, c("Rat", "Time", "weight", "Diet"))
co2 <- as_plain(datasets::CO2, c("Plant", "Type", "Treatment", "conc", "uptake"))

# Unit variants as extra columns of one file per data set; each new column's R expression is recorded in
# the JSON (`transforms`). Epoch times: day d as seconds (or milliseconds) since 1970 from 2023-11-14
# 22:13:20 UTC (1.7e9 s).
units_data <- list(
  sleepstudy_units = transform(
    sleep,
    Days_x1e8 = Days * 1e8,
    Days_epoch_s = Days * 86400 + 1.7e9,
    Days_epoch_ms = Days * 86400000 + 1.7e12,
    Reaction_plus_1e6 = Reaction + 1e6,
    Reaction_x1000 = Reaction * 1000
  ),
  bodyweight_units = transform(
    bodyweight,
    Time_x1e8 = Time * 1e8,
    Time_epoch_s = Time * 86400 + 1.7e9,
    weight_mg = weight * 1000,
    weight_plus_1e6 = weight + 1e6
  ),
  co2_units = transform(co2, conc_x1e8 = conc * 1e8)
)

exported <- c(
  list(
    oxboys = as_plain(nlme::Oxboys, c("Subject", "age", "height", "Occasion")),
    bodyweight = bodyweight,
    igf = as_plain(nlme::IGF, c("Lot", "age", "conc")),
    sim_seasonal = simulate_seasonal(),
    sim_collinear = simulate_collinear()
  ),
  units_data
)
for (name in names(exported)) {
  write.csv(exported[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

datasets <- list(
  oxboys = list(source = "nlme::Oxboys", subject = "Subject", time = "age", outcome = "height",
                factors = c("Subject", "Occasion")),
  bodyweight = list(source = "nlme::BodyWeight", subject = "Rat", time = "Time", outcome = "weight",
                    factors = c("Rat", "Diet")),
  igf = list(source = "nlme::IGF", subject = "Lot", time = "age", outcome = "conc", factors = c("Lot")),
  sim_seasonal = list(source = "make_reference_units.R: simulate_seasonal() (set.seed(901))",
                      subject = "id", time = "t", outcome = "y", factors = c("id", "arm")),
  sim_collinear = list(source = "make_reference_units.R: simulate_collinear() (set.seed(902))",
                       subject = "id", time = "t", outcome = "y", factors = c("id", "arm")),
  sleepstudy_units = list(source = "lme4::sleepstudy plus unit variants (see units$sleepstudy_units)",
                          subject = "Subject", time = "Days", outcome = "Reaction", factors = c("Subject")),
  bodyweight_units = list(source = "nlme::BodyWeight plus unit variants (see units$bodyweight_units)",
                          subject = "Rat", time = "Time", outcome = "weight", factors = c("Rat", "Diet")),
  co2_units = list(source = "datasets::CO2 plus unit variants (see units$co2_units)",
                   subject = "Plant", time = "conc", outcome = "uptake",
                   factors = c("Plant", "Type", "Treatment"))
)

read_dataset <- function(name) {
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (column in datasets[[name]]$factors) {
    frame[[column]] <- factor(as.character(frame[[column]]))
  }
  frame
}
frames <- lapply(setNames(names(datasets), names(datasets)), read_dataset)

# ------------------------------------------------------------------------------ fitting

# lmer() with every warning and message captured; an error becomes list(error = text).
run_lmer <- function(formula, frame, reml, control = lmerControl()) {
  run <- capture(lmer(as.formula(formula), data = frame, REML = reml, control = control))
  list(fit = run$value, messages = run$messages)
}

fit_record <- function(formula, frame, reml, control = lmerControl()) {
  run <- run_lmer(formula, frame, reml, control)
  fit <- run$fit
  if (!is(fit, "merMod")) {
    return(list(formula = formula, method = if (reml) "REML" else "ML", status = "error",
                error = fit$error, messages = as.list(run$messages)))
  }
  ll <- logLik(fit)
  beta <- fixef(fit)
  vcov_beta <- as.matrix(vcov(fit))
  se <- sqrt(diag(vcov_beta))
  vc <- as.data.frame(VarCorr(fit))
  is_sd <- vc$grp != "Residual" & is.na(vc$var2)
  is_corr <- vc$grp != "Residual" & !is.na(vc$var2)
  devcomp <- getME(fit, "devcomp")$cmp
  conv <- fit@optinfo$conv$lme4$messages
  dropped <- attr(getME(fit, "X"), "col.dropped")
  list(
    formula = formula,
    method = if (reml) "REML" else "ML",
    # "ok": no convergence warning from lme4 (a singular-fit message may be there); "warning": lme4 fitted
    # but its convergence checks complained (gradient, Hessian, scaling): the numbers are lme4's best try
    status = if (length(conv) == 0 || all(grepl("singular", conv))) "ok" else "warning",
    logLik = as.numeric(ll),
    df = as.integer(attr(ll, "df")),
    AIC = AIC(fit),
    BIC = BIC(fit),
    REML_criterion = if (reml) unname(devcomp[["REML"]]) else NULL,
    nobs = nobs(fit),
    fixed_effects = lapply(
      setNames(seq_along(beta), names(beta)),
      function(i) list(estimate = unname(beta[[i]]), std_error = unname(se[[i]]))
    ),
    vcov = unname(vcov_beta),
    random_effects = lapply(which(is_sd), function(i) list(grp = vc$grp[[i]], term = vc$var1[[i]],
                                                           sd = vc$sdcor[[i]])),
    correlations = lapply(which(is_corr), function(i) list(grp = vc$grp[[i]], term1 = vc$var1[[i]],
                                                           term2 = vc$var2[[i]], corr = vc$sdcor[[i]])),
    residual_sd = sigma(fit),
    theta = I(unname(getME(fit, "theta"))),
    isSingular = isSingular(fit),
    dropped_columns = if (is.null(dropped)) I(character()) else I(names(dropped)),
    convergence_messages = as.list(conv),
    messages = as.list(run$messages)
  )
}

# lme4's default fit and a refit with bobyqa run to rhoend = 1e-12: where the default stops short (a
# gradient warning) the refit shows by how much. `reference` names the better of the two (higher logLik,
# i.e. lower deviance or REML criterion), which is what the tests compare with.
tight_control <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
fit_both <- function(formula, frame, reml) {
  default <- fit_record(formula, frame, reml)
  tight <- fit_record(formula, frame, reml, tight_control)
  better <- if (tight$status != "error" && (default$status == "error" || tight$logLik > default$logLik)) {
    "tight"
  } else {
    "default"
  }
  list(default = default, tight = tight, reference = better)
}

# ------------------------------------------------------------------------------ 1. formula functions

formula_cases <- list(
  oxboys_poly2 = list(dataset = "oxboys", formula = "height ~ poly(age, 2) + (age | Subject)"),
  oxboys_poly3 = list(dataset = "oxboys", formula = "height ~ poly(age, 3) + (1 | Subject)"),
  oxboys_ns3 = list(dataset = "oxboys", formula = "height ~ ns(age, 3) + (1 | Subject)"),
  oxboys_ns4_slope = list(dataset = "oxboys", formula = "height ~ ns(age, 4) + (age | Subject)"),
  oxboys_bs3 = list(dataset = "oxboys", formula = "height ~ bs(age, 3) + (age | Subject)"),
  oxboys_bs5 = list(dataset = "oxboys", formula = "height ~ bs(age, 5) + (age | Subject)"),
  bodyweight_factor_time = list(dataset = "bodyweight", formula = "weight ~ factor(Time) + Diet + (1 | Rat)"),
  bodyweight_factor_time_slope = list(dataset = "bodyweight",
                                      formula = "weight ~ factor(Time) + Diet + (Time | Rat)"),
  bodyweight_poly_by_diet = list(dataset = "bodyweight", formula = "weight ~ poly(Time, 2) * Diet + (Time | Rat)"),
  # written without spaces on purpose: lme4 names the coefficients as R deparses them, "sin(2 * pi * t)"
  seasonal_sin_cos = list(dataset = "sim_seasonal", formula = "y ~ sin(2*pi*t) + cos(2*pi*t) + t + (1 | id)"),
  seasonal_sin_cos_slope = list(dataset = "sim_seasonal",
                                formula = "y ~ sin(2 * pi * t) + cos(2 * pi * t) + t * arm + (t | id)"),
  seasonal_scaled_time = list(dataset = "sim_seasonal",
                              formula = "y ~ sin(2 * pi * t) + cos(2 * pi * t) + I((t - 5)/7) + (t | id)")
)
formula_records <- list()
for (case in names(formula_cases)) {
  spec <- formula_cases[[case]]
  frame <- frames[[spec$dataset]]
  formula_records[[case]] <- list(
    dataset = spec$dataset, formula = spec$formula,
    ML = fit_both(spec$formula, frame, reml = FALSE),
    REML = fit_both(spec$formula, frame, reml = TRUE)
  )
  r <- formula_records[[case]]
  cat(sprintf("%-30s ML logLik %.6f (tight %.6f)  REML crit %.6f (tight %.6f)\n", case,
              r$ML$default$logLik, r$ML$tight$logLik, r$REML$default$REML_criterion,
              r$REML$tight$REML_criterion))
}

# ------------------------------------------------------------------------------ 2. collinear covariates

collinear_cases <- list(
  x2_after_x1 = list(dataset = "sim_collinear", formula = "y ~ t + x1 + x2 + (1 | id)"),
  x1_after_x2 = list(dataset = "sim_collinear", formula = "y ~ t + x2 + x1 + (1 | id)"),
  slope_x2_after_x1 = list(dataset = "sim_collinear", formula = "y ~ t + x1 + x2 + (t | id)"),
  big_units = list(dataset = "sim_collinear", formula = "y ~ t + x1_big + x2_big + (1 | id)"),
  indicator_of_factor = list(dataset = "sim_collinear", formula = "y ~ t + arm + treated + (t | id)")
)
collinear_records <- list()
for (case in names(collinear_cases)) {
  spec <- collinear_cases[[case]]
  frame <- frames[[spec$dataset]]
  collinear_records[[case]] <- list(
    dataset = spec$dataset, formula = spec$formula,
    ML = fit_both(spec$formula, frame, reml = FALSE),
    REML = fit_both(spec$formula, frame, reml = TRUE)
  )
  r <- collinear_records[[case]]
  cat(sprintf("%-30s dropped %s  df %d  ML logLik %.6f (tight %.6f)\n", case,
              paste(r$ML$default$dropped_columns, collapse = ","), r$ML$default$df, r$ML$default$logLik,
              r$ML$tight$logLik))
}

# ------------------------------------------------------------------------------ 3. awkward units

# The optimum of the uncorrelated model (1 | g) + (0 + x' | g) with x' = a x + b, b != 0, found in the
# original units x: there it is a correlated model whose random-effect covariance (in (1, x) coordinates,
# relative to sigma^2) is [[p0^2 + s^2 p1^2, s p1^2], [s p1^2, p1^2]] with s = b / a, p0 the relative
# intercept SD at x' = 0 and p1 the relative slope SD per unit x. The deviance comes from lme4's own
# deviance function of the correlated model in the original units (well conditioned); bobyqa from several
# starts and the boundary p0 = 0, best kept.
shifted_uncorrelated <- function(formula_original, frame, shift) {
  devfun <- lmer(as.formula(formula_original), data = frame, REML = FALSE, devFunOnly = TRUE)
  deviance_at <- function(p) {
    s11 <- p[1]^2 + shift^2 * p[2]^2
    s21 <- shift * p[2]^2
    l11 <- sqrt(s11)
    l21 <- if (l11 > 0) s21 / l11 else 0
    l22 <- sqrt(max(p[2]^2 - l21^2, 0))
    devfun(c(l11, l21, l22))
  }
  # The surface has several local optima: a grid over both SDs (log scale, plus each boundary), then bobyqa
  # from the 8 best grid points and a 1-D search along the p0 = 0 boundary.
  grid <- expand.grid(p0 = c(0, 10^seq(-4, 2, by = 0.25)), p1 = c(0, 10^seq(-9, 0, by = 0.25)))
  grid$deviance <- apply(grid[, c("p0", "p1")], 1, deviance_at)
  starts <- grid[order(grid$deviance)[1:8], c("p0", "p1")]
  tries <- lapply(seq_len(nrow(starts)), function(k) {
    st <- pmax(unlist(starts[k, ]), 1e-6 * c(1, 1e-3))
    o <- minqa::bobyqa(st, deviance_at, lower = c(0, 0), control = list(rhoend = 1e-12, maxfun = 1e5))
    list(par = o$par, deviance = o$fval)
  })
  boundary <- optimize(function(lp1) deviance_at(c(0, 10^lp1)), c(-12, 1), tol = 1e-12)
  tries[[length(tries) + 1]] <- list(par = c(0, 10^boundary$minimum), deviance = boundary$objective)
  best <- tries[[which.min(vapply(tries, function(t) t$deviance, 0))]]
  deviance_at(best$par)  # leaves the deviance function's environment at the optimum
  sigma <- sqrt(environment(devfun)$resp$wrss() + environment(devfun)$pp$sqrL(1)) / sqrt(nrow(frame))
  list(
    logLik = -best$deviance / 2,
    relative_sd_intercept_at_zero = best$par[1], relative_sd_slope_per_original_unit = best$par[2],
    residual_sd = sigma,
    grid_points = nrow(grid), best_grid_deviance = min(grid$deviance),
    deviances_from_each_start = vapply(tries, function(t) t$deviance, 0)
  )
}

units_specs <- list(
  sleepstudy_units = list(
    base = list(x = "Days", y = "Reaction"),
    candidates = c(
      ri = "{y} ~ {x} + (1 | Subject)",
      ris = "{y} ~ {x} + ({x} | Subject)",
      ris_uncorrelated = "{y} ~ {x} + ({x} || Subject)"
    ),
    transforms = list(
      days_x1e8 = list(x = "Days_x1e8", R = "Days * 1e8", x_scale = 1e8, x_shift = 0),
      days_epoch_s = list(x = "Days_epoch_s", R = "Days * 86400 + 1.7e9", x_scale = 86400, x_shift = 1.7e9),
      days_epoch_ms = list(x = "Days_epoch_ms", R = "Days * 86400000 + 1.7e12", x_scale = 86400000,
                           x_shift = 1.7e12),
      reaction_plus_1e6 = list(y = "Reaction_plus_1e6", R = "Reaction + 1e6", y_scale = 1, y_shift = 1e6),
      reaction_x1000 = list(y = "Reaction_x1000", R = "Reaction * 1000", y_scale = 1000, y_shift = 0)
    )
  ),
  bodyweight_units = list(
    base = list(x = "Time", y = "weight"),
    candidates = c(
      ri = "{y} ~ {x} + Diet + (1 | Rat)",
      ris = "{y} ~ {x} + Diet + ({x} | Rat)",
      ris_uncorrelated = "{y} ~ {x} + Diet + ({x} || Rat)"
    ),
    transforms = list(
      time_x1e8 = list(x = "Time_x1e8", R = "Time * 1e8", x_scale = 1e8, x_shift = 0),
      time_epoch_s = list(x = "Time_epoch_s", R = "Time * 86400 + 1.7e9", x_scale = 86400, x_shift = 1.7e9),
      weight_mg = list(y = "weight_mg", R = "weight * 1000", y_scale = 1000, y_shift = 0),
      weight_plus_1e6 = list(y = "weight_plus_1e6", R = "weight + 1e6", y_scale = 1, y_shift = 1e6)
    )
  ),
  co2_units = list(
    # conc (ambient CO2, mL/L) as a covariate of the fixed part only
    base = list(x = "conc", y = "uptake"),
    candidates = c(ri = "{y} ~ {x} + Type + Treatment + (1 | Plant)"),
    transforms = list(
      conc_x1e8 = list(x = "conc_x1e8", R = "conc * 1e8", x_scale = 1e8, x_shift = 0)
    )
  )
)

fill <- function(template, x, y) gsub("{y}", y, gsub("{x}", x, template, fixed = TRUE), fixed = TRUE)

# beta' = c M beta + d e_intercept, vcov' = c^2 M vcov M', for x' = a x + b (column x of the fixed
# effects) and y' = c y + d.
transformed_fixed <- function(record, x_name, x_new, a, b, c, d) {
  names_old <- names(record$fixed_effects)
  beta <- vapply(record$fixed_effects, function(e) e$estimate, 0)
  vcov_beta <- record$vcov
  M <- diag(length(beta))
  j <- match(x_name, names_old)
  if (a != 1 || b != 0) {
    M[j, j] <- 1 / a
    M[match("(Intercept)", names_old), j] <- -b / a
  }
  beta_new <- c * as.vector(M %*% beta)
  beta_new[match("(Intercept)", names_old)] <- beta_new[match("(Intercept)", names_old)] + d
  se_new <- sqrt(diag(c^2 * M %*% vcov_beta %*% t(M)))
  names_new <- names_old
  names_new[j] <- x_new
  lapply(setNames(seq_along(beta_new), names_new),
         function(i) list(estimate = beta_new[[i]], std_error = se_new[[i]]))
}

units_records <- list()
for (dataset in names(units_specs)) {
  spec <- units_specs[[dataset]]
  frame <- frames[[dataset]]
  n <- nrow(frame)
  # the original-units fits: the better of lme4's default and the tight refit (fit_both), so that the right
  # answers start from the optimum itself
  base_pairs <- lapply(spec$candidates, function(t) fit_both(fill(t, spec$base$x, spec$base$y), frame, FALSE))
  base <- lapply(base_pairs, function(pair) pair[[pair$reference]])
  for (candidate in names(base)) {
    if (base[[candidate]]$status != "ok") stop("original-units fit not clean: ", dataset, " ", candidate)
    cat(sprintf("%-17s original %-17s logLik %.6f (default %.6f)\n", dataset, candidate, base[[candidate]]$logLik,
                base_pairs[[candidate]]$default$logLik))
  }
  transforms <- list()
  for (transform_name in names(spec$transforms)) {
    tr <- spec$transforms[[transform_name]]
    x <- if (is.null(tr$x)) spec$base$x else tr$x
    y <- if (is.null(tr$y)) spec$base$y else tr$y
    a <- if (is.null(tr$x_scale)) 1 else tr$x_scale
    b <- if (is.null(tr$x_shift)) 0 else tr$x_shift
    c <- if (is.null(tr$y_scale)) 1 else tr$y_scale
    d <- if (is.null(tr$y_shift)) 0 else tr$y_shift
    fits <- list()
    for (candidate in names(spec$candidates)) {
      formula <- fill(spec$candidates[[candidate]], x, y)
      lme4_fit <- fit_record(formula, frame, FALSE)
      original <- base[[candidate]]
      if (grepl("||", formula, fixed = TRUE) && b != 0) {
        # not invariant to a shift: optimum of the shifted model, found in the original units
        opt <- shifted_uncorrelated(sub("||", "|", original$formula, fixed = TRUE), frame, b / a)
        right <- list(
          how = paste0("optimum of the uncorrelated model in ", x, " = ", tr$R, ", found through the ",
                       "correlated model in ", spec$base$x, " with its covariance constrained ",
                       "(shifted_uncorrelated()); not the original-units logLik, since (x || g) is not ",
                       "invariant to a shift of x"),
          logLik = opt$logLik, df = original$df,
          residual_sd = opt$residual_sd * c,
          random_effect_sds = list(
            intercept_at_zero = opt$relative_sd_intercept_at_zero * opt$residual_sd * c,
            slope = opt$relative_sd_slope_per_original_unit * opt$residual_sd * c / a
          ),
          optimizer_evidence = opt$deviances_from_each_start
        )
      } else {
        right <- list(
          how = paste0("original-units fit (", original$formula, ") with ", tr$R,
                       ": logLik - n ln(c), fixed effects and their covariance mapped exactly"),
          logLik = original$logLik - n * log(c), df = original$df,
          residual_sd = original$residual_sd * c,
          fixed_effects = transformed_fixed(original, spec$base$x, x, a, b, c, d)
        )
      }
      right$AIC <- -2 * right$logLik + 2 * right$df
      right$BIC <- -2 * right$logLik + log(n) * right$df
      lme4_right <- lme4_fit$status != "error" && abs(lme4_fit$logLik - right$logLik) < 1e-4
      fits[[candidate]] <- list(formula = formula, lme4 = lme4_fit, right = right,
                                lme4_reaches_right_answer = lme4_right)
      cat(sprintf("%-17s %-18s %-17s lme4 %-8s %s  right %.4f\n", dataset, transform_name, candidate,
                  lme4_fit$status,
                  if (lme4_fit$status == "error") lme4_fit$error else sprintf("%.4f", lme4_fit$logLik),
                  right$logLik))
    }
    choice <- function(criterion) names(fits)[which.min(vapply(fits, function(f) f$right[[criterion]], 0))]
    transforms[[transform_name]] <- list(
      R = tr$R, x = x, y = y, x_scale = a, x_shift = b, y_scale = c, y_shift = d,
      fits = fits,
      right_choice = list(AIC = choice("AIC"), BIC = choice("BIC"))
    )
  }
  units_records[[dataset]] <- list(
    dataset = dataset, nrow = n, base = spec$base, candidates = as.list(spec$candidates),
    original_fits = base, original_fits_default_and_tight = base_pairs,
    transforms = transforms
  )
}

# ------------------------------------------------------------------------------ 4. a singular fit lme4 keeps

singular_candidates <- c(
  ri = "conc ~ age + (1 | Lot)",
  ris = "conc ~ age + (age | Lot)",
  ris_uncorrelated = "conc ~ age + (age || Lot)"
)
singular_fits <- lapply(singular_candidates, function(f) fit_both(f, frames$igf, FALSE))
for (candidate in names(singular_fits)) {
  r <- singular_fits[[candidate]]
  cat(sprintf("igf %-17s ML logLik %.6f (tight %.6f) singular %s  %s\n", candidate, r$default$logLik,
              r$tight$logLik, r$default$isSingular, paste(r$default$messages, collapse = "; ")))
}
best_of <- function(pair) pair[[pair$reference]]
singular_records <- list(
  dataset = "igf", candidates = as.list(singular_candidates), fits = singular_fits,
  singular_candidate = "ris",
  # lowest AIC / BIC of the reference (better) fits, over all three and over the two random-slope models
  choice = list(
    AIC = names(singular_fits)[which.min(vapply(singular_fits, function(f) best_of(f)$AIC, 0))],
    BIC = names(singular_fits)[which.min(vapply(singular_fits, function(f) best_of(f)$BIC, 0))]
  ),
  slope_choice = list(
    AIC = c("ris", "ris_uncorrelated")[which.min(c(best_of(singular_fits$ris)$AIC,
                                                   best_of(singular_fits$ris_uncorrelated)$AIC))],
    BIC = c("ris", "ris_uncorrelated")[which.min(c(best_of(singular_fits$ris)$BIC,
                                                   best_of(singular_fits$ris_uncorrelated)$BIC))]
  )
)

# ------------------------------------------------------------------------------ write

dataset_records <- lapply(setNames(names(datasets), names(datasets)), function(name) {
  spec <- datasets[[name]]
  list(file = file.path("data", paste0(name, ".csv")), source = spec$source, subject = spec$subject,
       time = spec$time, outcome = spec$outcome, factors = as.list(spec$factors), nrow = nrow(frames[[name]]),
       columns = as.list(names(frames[[name]])))
})

reference <- list(
  generated_by = "Rscript tests/reference/make_reference_units.R",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  Matrix_version = as.character(packageVersion("Matrix")),
  nlme_version = as.character(packageVersion("nlme")),
  splines_version = as.character(packageVersion("splines")),
  minqa_version = as.character(packageVersion("minqa")),
  datasets = dataset_records,
  formula_functions = formula_records,
  collinear = collinear_records,
  units = units_records,
  singular = singular_records
)
out <- file.path(ref_dir, "lme4_reference_units.json")
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"), out)
cat("wrote", out, "\n")
