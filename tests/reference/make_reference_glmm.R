# Reference numbers from lme4's glmer for issue 14 (binomial and Poisson GLMMs), read by
# tests/test_reference_glmm.py.
#
# Run from the repository root:   Rscript tests/reference/make_reference_glmm.R
# Needs R with lme4, MASS and jsonlite (Debian: r-base-core r-cran-lme4 r-cran-jsonlite; MASS comes with
# r-base-core's recommended packages). About a minute.
#
# What it does:
#   1. simulates two longitudinal studies (set.seed 1401, 1402) and exports them and four public data sets
#      (MASS::bacteria, MASS::epil, lme4::cbpp expanded to one 0/1 row per animal, lme4::grouseticks) to
#      tests/reference/data/glmm_*.csv, factors as plain text;
#   2. reads every data set back from its CSV, the columns listed in `factors` as factor(as.character(x))
#      under the C collation (levels sort as Python sorts strings: bacteria's trt reference level is "drug",
#      not MASS's "placebo"), every other column numeric;
#   3. fits every candidate with glmer (family binomial or poisson, canonical link) at its nAGQ and writes
#      tests/reference/glmer_reference.json. Nothing is rounded.
#
# Each fit is attempted several ways: glmer's defaults (glmerControl(): bobyqa, then Nelder_Mead for the
# joint second stage over theta and beta), bobyqa for both stages with maxfun = 1e5, the same with the
# penalized IRLS tolerance tolPwrss = 1e-12 (default 1e-7), and that restarted from the best estimates so far
# (start = list(theta, fixef)) until it no longer improves. Each attempt's estimates are re-evaluated by
# glmer's own deviance function at tolPwrss = 1e-12 (`checked_logLik`, see checked_loglik()); the attempt
# with the highest checked logLik is the reference (`attempt` names it). `attempts` keeps every try with its
# logLik, checked logLik, warnings and messages; `default_logLik` and `default_messages` say how far glmer's
# defaults got and what they said.
#
# Conventions the Python side relies on:
#   - `df` = attr(logLik(fit), "df") = fixed effects + theta (no residual variance); BIC uses n = rows.
#   - `std_error` is sqrt(diag(vcov(fit))): glmer's default, from the finite-difference Hessian of the
#     deviance over (theta, beta); `std_error_rx` is the one from the Laplace approximation's RX factor
#     (vcov(fit, use.hessian = FALSE)), for comparison, and `std_error_central` the one from a central-difference
#     Hessian of the same deviance at step 1e-3 (non-singular fits; a check of glmer's, see
#     central_difference_se()).
#   - Random effects list lme4's `grp` (as.data.frame(VarCorr(fit)): "id.1" for the second bar of
#     (t || id), "period:herd" for the nested factor of (1 | herd/period)) and `factors`, the data columns
#     the grouping factor combines, sorted (the Python side writes herd:period).
#   - glmer reports the Poisson logLik on another scale when nAGQ > 1: its adaptive quadrature deviance
#     leaves out the saturated model's log-likelihood sum(dpois(y, y, log = TRUE)) that the Laplace logLik
#     includes (the binomial one is 0 for 0/1 data, so there both scales agree). `logLik_comparable` is FALSE
#     for those fits. `integrated_logLik`, for every fit with one scalar random effect, is the marginal
#     log-likelihood at glmer's estimates computed here by numerical integration (integrate(), subject by
#     subject, around each subject's mode): the definition the quadrature approximates, on the Laplace scale.
#   - `bic_choice` is the candidate with the lowest BIC among the data set's Laplace (nAGQ = 1) fits,
#     `bic_margin` how far the second is behind.
#   - The pipeline's formula grammar has no comparison operators: bacteria's I(week > 2) is the 0/1 column
#     `week_gt2` (the same model and logLik; the coefficient is named "week_gt2", not "I(week > 2)TRUE").

suppressPackageStartupMessages({
  library(lme4)
  library(MASS)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

# ------------------------------------------------------------------------------ simulated studies

simulate_binary_trial <- function() {
  # 300 subjects x 5 visits (t = 0..4), two arms, correlated random intercept (SD 1.3) and slope (SD 0.35,
  # correlation -0.3) on the logit scale; the treatment arm's log-odds fall over time.
  set.seed(1401)
  subjects <- sprintf("s%03d", 1:300)
  grid <- expand.grid(t = 0:4, id = subjects, stringsAsFactors = FALSE)
  i <- match(grid$id, subjects)
  grid$arm <- rep(c("control", "treatment"), length.out = length(subjects))[i]
  z1 <- rnorm(length(subjects))
  z2 <- rnorm(length(subjects))
  intercept <- 1.3 * z1
  slope <- 0.35 * (-0.3 * z1 + sqrt(1 - 0.3^2) * z2)
  treated <- grid$arm == "treatment"
  eta <- -0.4 + 0.25 * grid$t + 0.1 * treated - 0.45 * grid$t * treated + intercept[i] + slope[i] * grid$t
  grid$y <- rbinom(nrow(grid), 1, plogis(eta))
  grid[, c("id", "arm", "t", "y")]
}

simulate_count_study <- function() {
  # 200 subjects x 6 visits (t = 0..5), two arms, counts with a correlated random intercept (SD 0.5) and
  # slope (SD 0.15, correlation 0.3) on the log scale.
  set.seed(1402)
  subjects <- sprintf("c%03d", 1:200)
  grid <- expand.grid(t = 0:5, id = subjects, stringsAsFactors = FALSE)
  i <- match(grid$id, subjects)
  grid$arm <- rep(c("control", "treatment"), length.out = length(subjects))[i]
  z1 <- rnorm(length(subjects))
  z2 <- rnorm(length(subjects))
  intercept <- 0.5 * z1
  slope <- 0.15 * (0.3 * z1 + sqrt(1 - 0.3^2) * z2)
  eta <- 0.8 + 0.12 * grid$t - 0.25 * (grid$arm == "treatment") + intercept[i] + slope[i] * grid$t
  grid$y <- rpois(nrow(grid), exp(eta))
  grid[, c("id", "arm", "t", "y")]
}

# ------------------------------------------------------------------------------ public data sets

bacteria_frame <- function() {
  b <- MASS::bacteria
  b$y01 <- as.integer(b$y == "y")
  b$week_gt2 <- as.integer(b$week > 2)
  as_plain(b, c("ID", "week", "trt", "ap", "hilo", "y", "y01", "week_gt2"))
}

cbpp_frame <- function() {
  # One row per animal: `incidence` rows with y = 1 and size - incidence with y = 0 per herd and period.
  cb <- lme4::cbpp
  rows <- lapply(seq_len(nrow(cb)), function(i) data.frame(
    herd = as.character(cb$herd[[i]]), period = as.character(cb$period[[i]]),
    y = c(rep(1L, cb$incidence[[i]]), rep(0L, cb$size[[i]] - cb$incidence[[i]])), stringsAsFactors = FALSE))
  frame <- do.call(rbind, rows)
  rownames(frame) <- NULL
  frame
}

# ------------------------------------------------------------------------------ data sets and candidates
# candidates: name = c(formula, nAGQ). Formulas as the pipeline reads them.

candidate <- function(formula, nagq = 1L) list(formula = formula, nagq = as.integer(nagq))

datasets <- list(
  glmm_sim_binary = list(
    source = "make_reference_glmm.R: simulate_binary_trial() (set.seed(1401)): 300 subjects x 5 visits",
    frame = simulate_binary_trial(), family = "binomial",
    subject = "id", time = "t", outcome = "y", factors = c("id", "arm"),
    candidates = list(
      ri = candidate("y ~ t * arm + (1 | id)"),
      ris = candidate("y ~ t * arm + (t | id)"),
      ris_uncorrelated = candidate("y ~ t * arm + (t || id)"),
      ri_agq5 = candidate("y ~ t * arm + (1 | id)", 5),
      ri_agq10 = candidate("y ~ t * arm + (1 | id)", 10),
      ri_agq25 = candidate("y ~ t * arm + (1 | id)", 25)
    )
  ),
  glmm_sim_count = list(
    source = "make_reference_glmm.R: simulate_count_study() (set.seed(1402)): 200 subjects x 6 visits",
    frame = simulate_count_study(), family = "poisson",
    subject = "id", time = "t", outcome = "y", factors = c("id", "arm"),
    candidates = list(
      ri = candidate("y ~ t + arm + (1 | id)"),
      ris = candidate("y ~ t + arm + (t | id)"),
      ris_uncorrelated = candidate("y ~ t + arm + (t || id)"),
      ri_agq10 = candidate("y ~ t + arm + (1 | id)", 10)
    )
  ),
  glmm_bacteria = list(
    source = paste("MASS::bacteria: H. influenzae present (y = 'y') at weeks 0, 2, 4, 6, 11 in 50 children;",
                   "y01 = (y == 'y'), week_gt2 = (week > 2)"),
    frame = bacteria_frame(), family = "binomial",
    subject = "ID", time = "week", outcome = "y01", factors = c("ID", "trt", "ap", "hilo", "y"),
    candidates = list(
      ri = candidate("y01 ~ trt + week_gt2 + (1 | ID)"),
      ri_agq10 = candidate("y01 ~ trt + week_gt2 + (1 | ID)", 10),
      ris = candidate("y01 ~ trt + week_gt2 + (week | ID)"),
      ris_uncorrelated = candidate("y01 ~ trt + week_gt2 + (week || ID)")
    )
  ),
  glmm_epil = list(
    source = paste("MASS::epil: seizure counts of 59 epileptics in 4 two-week periods; lbase, lage as in MASS",
                   "(centred logs of the baseline count / 4 and of age)"),
    frame = as_plain(MASS::epil, c("subject", "period", "y", "trt", "base", "age", "V4", "lbase", "lage")),
    family = "poisson",
    subject = "subject", time = "period", outcome = "y", factors = c("subject", "trt"),
    candidates = list(
      ri = candidate("y ~ lbase * trt + lage + V4 + (1 | subject)"),
      ris = candidate("y ~ lbase * trt + lage + V4 + (period | subject)"),
      ris_uncorrelated = candidate("y ~ lbase * trt + lage + V4 + (period || subject)"),
      ri_overdispersed = candidate("y ~ lbase * trt + lage + V4 + (1 | subject/period)")
    )
  ),
  glmm_cbpp = list(
    source = "lme4::cbpp expanded to one 0/1 row per animal (incidence of size, per herd and period)",
    frame = cbpp_frame(), family = "binomial",
    subject = "herd", time = "period", outcome = "y", factors = c("herd", "period"),
    candidates = list(
      herd = candidate("y ~ period + (1 | herd)"),
      herd_agq10 = candidate("y ~ period + (1 | herd)", 10),
      herd_period = candidate("y ~ period + (1 | herd/period)"),
      herd_period_only = candidate("y ~ period + (1 | herd:period)")
    )
  ),
  glmm_grouseticks = list(
    source = "lme4::grouseticks: ticks on red grouse chicks (403), 118 broods, 63 locations, 3 years; cHEIGHT = HEIGHT centred",
    frame = as_plain(lme4::grouseticks, c("INDEX", "TICKS", "BROOD", "HEIGHT", "cHEIGHT", "YEAR", "LOCATION")),
    family = "poisson",
    subject = "BROOD", time = NULL, outcome = "TICKS", factors = c("INDEX", "BROOD", "YEAR", "LOCATION"),
    candidates = list(
      brood_location = candidate("TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)"),
      brood_location_index = candidate("TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"),
      brood = candidate("TICKS ~ YEAR + cHEIGHT + (1 | BROOD)"),
      location = candidate("TICKS ~ YEAR + cHEIGHT + (1 | LOCATION)")
    )
  )
)
# cbpp is herd x period with period "1".."4": the same in both collations. bacteria: levels "drug", "drug+",
# "placebo" under C (MASS orders placebo, drug, drug+).

for (name in names(datasets)) {
  write.csv(datasets[[name]]$frame, file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

read_dataset <- function(name, spec) {
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (column in spec$factors) frame[[column]] <- factor(as.character(frame[[column]]))
  frame
}

# ------------------------------------------------------------------------------ fitting

family_of <- function(name) if (name == "binomial") binomial() else poisson()

attempt <- function(formula, frame, family, nagq, control = NULL, start = NULL) {
  args <- list(formula = as.formula(formula), data = frame, family = family_of(family), nAGQ = nagq)
  if (!is.null(control)) args$control <- control
  if (!is.null(start)) args$start <- start
  run <- capture(do.call(glmer, args))
  fit <- run$value
  list(fit = if (is(fit, "merMod")) fit else NULL, error = if (is(fit, "merMod")) NULL else fit$error,
       messages = run$messages, seconds = run$seconds,
       logLik = if (is(fit, "merMod")) as.numeric(logLik(fit)) else NA_real_)
}

bobyqa <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
tight <- glmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5), tolPwrss = 1e-12)

# -logLik/2 as glmer's deviance function computes it at (theta, beta) with the penalized IRLS for the
# conditional modes run to tolPwrss = 1e-12. glmer's default tolPwrss = 1e-7 leaves its Laplace deviance
# inexact by up to 0.02 at some points (glmm_sim_binary ris: bobyqa's optimum reports logLik -962.5895 where
# the Laplace approximation written out subject by subject, and this function, give -962.5786): an attempt's
# `checked_logLik` is its estimates' log-likelihood evaluated this way, and the reference is the attempt with
# the highest checked logLik.
checked_loglik <- function(fit, formula, frame, family, nagq) {
  devfun <- glmer(as.formula(formula), data = frame, family = family_of(family), nAGQ = nagq, control = tight,
                  devFunOnly = TRUE)
  -devfun(c(unname(getME(fit, "theta")), unname(fixef(fit)))) / 2
}

fit_best <- function(formula, frame, family, nagq) {
  runs <- list(
    default = attempt(formula, frame, family, nagq),
    bobyqa = attempt(formula, frame, family, nagq, control = bobyqa),
    tight = attempt(formula, frame, family, nagq, control = tight)
  )
  check <- function(r) {
    r$checked_logLik <- if (is.null(r$fit)) NA_real_ else checked_loglik(r$fit, formula, frame, family, nagq)
    r
  }
  runs <- lapply(runs, check)
  best_of <- function() {
    ok <- Filter(function(r) !is.null(r$fit), runs)
    names(ok)[which.max(vapply(ok, function(r) r$checked_logLik, 0))]
  }
  for (r in 1:3) {
    best <- runs[[best_of()]]
    start <- list(theta = unname(getME(best$fit, "theta")), fixef = unname(fixef(best$fit)))
    name <- paste0("restart_", r)
    runs[[name]] <- check(attempt(formula, frame, family, nagq, control = tight, start = start))
    if (is.null(runs[[name]]$fit) || runs[[name]]$checked_logLik < best$checked_logLik + 1e-9) break
  }
  chosen <- best_of()
  list(chosen = chosen, fit = runs[[chosen]]$fit, messages = runs[[chosen]]$messages, runs = runs)
}

# The grouping factor of each row of as.data.frame(VarCorr(fit)), as the sorted data columns it combines:
# its rows list, bar by bar in getME(fit, "cnms") order, the q SDs then the q(q - 1)/2 correlations.
row_factors <- function(fit) {
  cnms <- getME(fit, "cnms")
  rep(names(cnms), vapply(cnms, function(x) length(x) * (length(x) + 1) / 2, 1))
}
columns_of <- function(factor_name) I(sort(strsplit(factor_name, ":", fixed = TRUE)[[1]]))

# The marginal log-likelihood at the fit's estimates by numerical integration, for one scalar random effect:
# sum over groups of log integral prod_j f(y_j | eta_j + sigma u) phi(u) du, each integral taken around the
# group's mode over +- 40 curvature scales (the integrand is log-concave for these canonical links).
integrated_loglik <- function(fit, family) {
  beta <- fixef(fit)
  sigma <- unname(getME(fit, "theta"))[[1]]
  X <- getME(fit, "X")
  y <- getME(fit, "y")
  offset <- as.vector(X %*% beta)
  g <- getME(fit, "flist")[[1]]
  conditional <- if (family == "binomial") {
    function(eta, yy) sum(dbinom(yy, 1, plogis(eta), log = TRUE))
  } else {
    function(eta, yy) sum(dpois(yy, exp(eta), log = TRUE))
  }
  total <- 0
  for (rows in split(seq_along(y), g)) {
    eta0 <- offset[rows]
    yy <- y[rows]
    if (sigma == 0) {
      total <- total + conditional(eta0, yy)
      next
    }
    h <- function(u) vapply(u, function(v) conditional(eta0 + sigma * v, yy) + dnorm(v, log = TRUE), 0)
    mode <- optimize(function(u) -h(u), c(-30, 30), tol = 1e-10)$minimum
    peak <- h(mode)
    step <- 1e-4
    curvature <- -(h(mode + step) - 2 * peak + h(mode - step)) / step^2
    scale <- 1 / sqrt(max(curvature, 1e-8))
    area <- integrate(function(u) exp(h(u) - peak), mode - 40 * scale, mode + 40 * scale,
                      rel.tol = 1e-12, abs.tol = 0, subdivisions = 2000L)$value
    total <- total + peak + log(area)
  }
  total
}

one_scalar_effect <- function(fit) {
  cnms <- getME(fit, "cnms")
  length(cnms) == 1 && identical(cnms[[1]], "(Intercept)")
}

# The fixed effects' SEs from a central-difference Hessian of glmer's deviance at tolPwrss = 1e-12 over
# (theta, beta), at the reference estimates with an absolute step of 1e-3 (glmer's own derivatives use 1e-4):
# a check that glmer's finite-difference SEs do not depend on its step. (numDeriv's Richardson extrapolation
# was tried first: on grouseticks' brood_location_index its smallest steps meet the deviance's rounding and
# it gives SEs up to 4% off, where steps 1e-3 and 3e-4 both reproduce glmer's to 3e-5.) NULL for a singular
# fit (theta on its boundary, where the deviance is not smooth).
central_difference_se <- function(fit, cand, frame, family, step = 1e-3) {
  if (isSingular(fit)) return(NULL)
  devfun <- glmer(as.formula(cand$formula), data = frame, family = family_of(family), nAGQ = cand$nagq,
                  control = tight, devFunOnly = TRUE)
  theta <- unname(getME(fit, "theta"))
  at <- c(theta, unname(fixef(fit)))
  n <- length(at)
  hessian <- matrix(0, n, n)
  for (i in 1:n) for (j in i:n) {
    ei <- replace(numeric(n), i, step)
    ej <- replace(numeric(n), j, step)
    hessian[i, j] <- hessian[j, i] <- (devfun(at + ei + ej) - devfun(at + ei - ej) - devfun(at - ei + ej) +
                                         devfun(at - ei - ej)) / (4 * step^2)
  }
  setNames(sqrt(diag(solve(hessian / 2)))[-seq_along(theta)], names(fixef(fit)))
}

fit_record <- function(cand, frame, spec) {
  best <- fit_best(cand$formula, frame, spec$family, cand$nagq)
  fit <- best$fit
  if (is.null(fit)) stop(cand$formula, ": every attempt failed")
  ll <- logLik(fit)
  df <- as.integer(attr(ll, "df"))
  beta <- fixef(fit)
  hessian <- capture(as.matrix(vcov(fit)))  # glmer warns here when the Hessian is not positive definite
  se <- sqrt(diag(hessian$value))
  # vcov warns that the two differ (by more than 1e-4): that is what `std_error_rx` is kept for
  se_rx <- sqrt(diag(as.matrix(suppressWarnings(vcov(fit, use.hessian = FALSE)))))
  se_central <- central_difference_se(fit, cand, frame, spec$family)
  vc <- as.data.frame(VarCorr(fit))
  factor_of <- row_factors(fit)
  is_sd <- is.na(vc$var2)
  saturated <- if (spec$family == "poisson") sum(dpois(getME(fit, "y"), getME(fit, "y"), log = TRUE)) else 0
  list(
    formula = cand$formula,
    family = spec$family,
    nagq = cand$nagq,
    logLik = as.numeric(ll),
    checked_logLik = best$runs[[best$chosen]]$checked_logLik,
    logLik_comparable = !(spec$family == "poisson" && cand$nagq > 1),
    saturated_logLik = saturated,
    integrated_logLik = if (one_scalar_effect(fit)) integrated_loglik(fit, spec$family) else NULL,
    df = df,
    AIC = AIC(fit),
    BIC = BIC(fit),
    deviance = deviance(fit),
    nobs = nobs(fit),
    ngrps = as.list(ngrps(fit)),
    fixed_effects = lapply(setNames(seq_along(beta), names(beta)), function(i) list(
      estimate = unname(beta[[i]]), std_error = unname(se[[i]]), std_error_rx = unname(se_rx[[i]]),
      std_error_central = if (is.null(se_central)) NULL else unname(se_central[[i]]))),
    vcov = unname(hessian$value),
    vcov_messages = as.list(hessian$messages),
    random_effects = lapply(which(is_sd), function(i) list(
      grp = vc$grp[[i]], factors = columns_of(factor_of[[i]]), term = vc$var1[[i]],
      variance = vc$vcov[[i]], sd = vc$sdcor[[i]])),
    correlations = lapply(which(!is_sd), function(i) list(
      grp = vc$grp[[i]], factors = columns_of(factor_of[[i]]), term1 = vc$var1[[i]], term2 = vc$var2[[i]],
      corr = vc$sdcor[[i]])),
    theta = I(unname(getME(fit, "theta"))),
    isSingular = isSingular(fit),
    optimizer = I(fit@optinfo$optimizer),
    attempt = best$chosen,
    messages = as.list(best$messages),
    convergence_messages = as.list(fit@optinfo$conv$lme4$messages),
    default_logLik = best$runs$default$logLik,
    default_checked_logLik = best$runs$default$checked_logLik,
    default_messages = as.list(best$runs$default$messages),
    attempts = lapply(best$runs, function(r) list(
      logLik = r$logLik, checked_logLik = r$checked_logLik, error = r$error, messages = as.list(r$messages), seconds = r$seconds))
  )
}

records <- list()
for (name in names(datasets)) {
  spec <- datasets[[name]]
  frame <- read_dataset(name, spec)
  fits <- list()
  for (cand_name in names(spec$candidates)) {
    cand <- spec$candidates[[cand_name]]
    rec <- fit_record(cand, frame, spec)
    fits[[cand_name]] <- rec
    cat(sprintf("%-17s %-21s nAGQ %2d logLik %.6f df %d (%s; checked %+.1e; default %+.1e)%s\n", name,
                cand_name, cand$nagq, rec$logLik, rec$df, rec$attempt, rec$checked_logLik - rec$logLik,
                rec$default_logLik - rec$logLik,
                if (length(rec$default_messages)) paste0("  [", paste(rec$default_messages, collapse = " | "), "]") else ""))
  }
  laplace <- Filter(function(f) f$nagq == 1L, fits)
  bic <- sort(vapply(laplace, function(f) f$BIC, 0))
  records[[name]] <- list(
    file = file.path("data", paste0(name, ".csv")),
    source = spec$source,
    family = spec$family,
    subject = spec$subject, time = spec$time, outcome = spec$outcome,
    factors = as.list(spec$factors),
    nrow = nrow(frame),
    candidates = spec$candidates,
    bic_choice = names(bic)[[1]],
    bic_margin = unname(bic[[2]] - bic[[1]]),
    fits = fits
  )
  cat(sprintf("%-17s BIC choice %s (by %.2f)\n", name, names(bic)[[1]], bic[[2]] - bic[[1]]))
}

reference <- list(
  generated_by = "Rscript tests/reference/make_reference_glmm.R",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  Matrix_version = as.character(packageVersion("Matrix")),
  MASS_version = as.character(packageVersion("MASS")),
  datasets = records
)
out <- file.path(ref_dir, "glmer_reference.json")
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"), out)
cat("wrote", out, "\n")
