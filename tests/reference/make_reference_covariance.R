# Reference numbers from nlme (and glmmTMB, lme4 as cross-checks) for issue 13: structured residual
# covariance models (mmrm notation) with and without random effects.
#
# Run from the repository root:   Rscript tests/reference/make_reference_covariance.R
# Needs R with nlme, lme4, glmmTMB (Debian: r-cran-glmmtmb) and jsonlite. About a minute.
#
# What it does:
#   1. exports four data sets to tests/reference/data/cov_*.csv, factors as plain text: a simulated
#      MMRM trial (set.seed(1301): 2 arms, 6 visits, monotone dropout and intermittent missed visits,
#      true unstructured covariance), nlme::Orthodont (4 visits), nlme::Ovary (irregular times within mare)
#      and a simulated study with irregular continuous times (set.seed(1303));
#   2. reads every data set back from its CSV, so R fits exactly the numbers that Python reads;
#   3. fits every (data set, structure) by ML and by REML with nlme::gls (residual structures) or nlme::lme
#      (random effects + residual structure), each from several optimizer settings and starts, keeps the
#      best logLik as the reference, and writes tests/reference/nlme_reference_covariance.json. Nothing is
#      rounded;
#   4. for a few of those fits, nlme's normalized residuals, fitted values, residuals and random-effect modes
#      per row / subject (`per_row`).
#
# Terms (mmrm notation) and the nlme forms used; m = number of visit levels, visit_index = the integer
# position 1..m of the visit level (the order ar1/toep/us use; missed visits leave gaps):
#   us(visit | id)    corSymm(form = ~ visit_index | id) + varIdent(form = ~ 1 | visit)     m(m+1)/2
#   cs(visit | id)    corCompSymm(form = ~ visit_index | id)                                 2
#   csh(visit | id)   corCompSymm(form = ~ visit_index | id) + varIdent(form = ~ 1 | visit)  m + 1
#   ar1(visit | id)   corAR1(form = ~ visit_index | id)                                      2
#   ar1h(visit | id)  corAR1(form = ~ visit_index | id) + varIdent(form = ~ 1 | visit)       m + 1
#   toep(visit | id)  corARMA(form = ~ visit_index | id, p = m - 1)                          m
#   toeph(visit | id) corARMA(form = ~ visit_index | id, p = m - 1) + varIdent(~ 1 | visit)  2m - 1
#   sp_exp(t | id)    corExp(form = ~ t | id) (nugget = FALSE): corr = exp(-|t - t'| / range)  2
#   (1 | id) + ar1(visit | id)   lme(random = ~ 1 | id, correlation = corAR1(form = ~ visit_index | id))
#   (1 | id) + sp_exp(t | id)    lme(random = ~ 1 | id, correlation = corExp(form = ~ t | id))
#   (t | id) + sp_exp(t | id)    lme(random = ~ t | id, correlation = corExp(form = ~ t | id))
# ad / adh (ante-dependence, mmrm's definition) have no R implementation in Debian: not covered.
#
# Conventions: the `factors` columns become factor(as.character(x)) under the C collation (so "SexMale",
# "armtreatment", "visit2"); every other column stays numeric. df = attr(logLik(fit), "df") = fixed effects
# + covariance parameters (+ 1 for sigma), which equals the issue's k. nlme's BIC uses n = rows for ML and
# n = rows - p for REML; the JSON also holds BIC with n = rows and with n = subjects for both.

suppressPackageStartupMessages({
  library(nlme)
  library(lme4)
  library(glmmTMB)
  library(jsonlite)
})

invisible(Sys.setlocale("LC_COLLATE", "C"))
started <- Sys.time()

source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

# ------------------------------------------------------------------------------ data

# True covariance of the simulated trial: standard deviations rising over the visits, correlations that
# decay with the lag but more slowly between later visits (neither Toeplitz nor compound symmetric).
mmrm_truth <- function() {
  m <- 6
  sds <- c(4.0, 4.4, 4.9, 5.3, 5.8, 6.4)
  lag <- abs(outer(1:m, 1:m, "-"))
  first <- outer(1:m, 1:m, pmin)
  corr <- 0.25 + 0.75 * (0.6 + 0.05 * first)^lag
  list(sd = sds, correlation = corr, covariance = diag(sds) %*% corr %*% diag(sds),
       mean_control = c(30, 28.6, 27.7, 27.1, 26.6, 26.3),
       effect_treatment = c(0, -0.4, -1.1, -1.7, -2.2, -2.6))
}

simulate_mmrm <- function() {
  # 150 subjects, arms alternating, 6 scheduled visits (t = months 0..5). Monotone dropout after each
  # visit with logit probability -3 + 0.15 (y_prev - control mean), i.e. depending on the previous value
  # (MAR when that value was seen); a missed visit 2..5 (probability 0.04) for those still in the study.
  set.seed(1301)
  truth <- mmrm_truth()
  n <- 150
  m <- 6
  ids <- sprintf("p%03d", 1:n)
  arm <- rep(c("control", "treatment"), length.out = n)
  root <- chol(truth$covariance)
  rows <- list()
  for (i in 1:n) {
    mu <- truth$mean_control + (arm[i] == "treatment") * truth$effect_treatment
    y <- mu + as.vector(rnorm(m) %*% root)
    seen <- rep(TRUE, m)
    for (k in 2:m) {
      if (runif(1) < plogis(-3 + 0.15 * (y[k - 1] - truth$mean_control[k - 1]))) {
        seen[k:m] <- FALSE
        break
      }
    }
    missed <- runif(m) < 0.04 & seq_len(m) %in% 2:5
    seen <- seen & !missed
    rows[[i]] <- data.frame(id = ids[i], arm = arm[i], visit = as.character(1:m), t = 0:(m - 1),
                            y = round(y, 3), stringsAsFactors = FALSE)[seen, ]
  }
  out <- do.call(rbind, rows)
  rownames(out) <- NULL
  out
}

simulate_irregular <- function() {
  # 80 subjects, arms alternating, a baseline at t = 0 and 3..8 further visits at uniform times in (0, 12]
  # (2 decimals, distinct). y = 50 + 1.2 t - 0.5 t [treatment] + b0 + b1 t + w(t): (b0, b1) with SDs 4 and
  # 0.4, correlation 0.3; w a continuous-time exponential process, SD 3, range 2.5; no extra noise.
  set.seed(1303)
  n <- 80
  ids <- sprintf("q%03d", 1:n)
  arm <- rep(c("control", "treatment"), length.out = n)
  rows <- list()
  for (i in 1:n) {
    k <- sample(3:8, 1)
    times <- c(0, sort(unique(round(runif(k, 0.01, 12), 2))))
    b0 <- rnorm(1, 0, 4)
    b1 <- 0.4 * (0.3 * b0 / 4 + sqrt(1 - 0.3^2) * rnorm(1))
    w_cov <- 9 * exp(-abs(outer(times, times, "-")) / 2.5)
    w <- as.vector(t(chol(w_cov)) %*% rnorm(length(times)))
    y <- 50 + 1.2 * times - 0.5 * times * (arm[i] == "treatment") + b0 + b1 * times + w
    rows[[i]] <- data.frame(id = ids[i], arm = arm[i], t = times, y = round(y, 3), stringsAsFactors = FALSE)
  }
  out <- do.call(rbind, rows)
  rownames(out) <- NULL
  out
}

orthodont <- as_plain(nlme::Orthodont, c("Subject", "Sex", "age", "distance"))
orthodont$visit <- as.character(match(orthodont$age, c(8, 10, 12, 14)))
orthodont <- orthodont[order(orthodont$Subject, orthodont$age), c("Subject", "Sex", "visit", "age", "distance")]
ovary <- as_plain(nlme::Ovary, c("Mare", "Time", "follicles"))
ovary <- ovary[order(as.integer(ovary$Mare), ovary$Time), ]

exported <- list(
  cov_sim_mmrm = simulate_mmrm(),
  cov_orthodont = orthodont,
  cov_ovary = ovary,
  cov_sim_irregular = simulate_irregular()
)
for (name in names(exported)) {
  write.csv(exported[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

datasets <- list(
  cov_sim_mmrm = list(
    source = "make_reference_covariance.R: simulate_mmrm() (set.seed(1301)); true covariance in `truth`",
    subject = "id", visit = "visit", time = "t", outcome = "y", factors = c("id", "arm", "visit")),
  cov_orthodont = list(
    source = "nlme::Orthodont; visit = 1..4 for age 8, 10, 12, 14",
    subject = "Subject", visit = "visit", time = "age", outcome = "distance",
    factors = c("Subject", "Sex", "visit")),
  cov_ovary = list(
    source = "nlme::Ovary (Mare as text; Time is irregular within mare)",
    subject = "Mare", visit = NULL, time = "Time", outcome = "follicles", factors = c("Mare")),
  cov_sim_irregular = list(
    source = "make_reference_covariance.R: simulate_irregular() (set.seed(1303))",
    subject = "id", visit = NULL, time = "t", outcome = "y", factors = c("id", "arm"))
)

read_dataset <- function(name) {
  spec <- datasets[[name]]
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (column in spec$factors) {
    frame[[column]] <- factor(as.character(frame[[column]]))
  }
  if (!is.null(spec$visit)) {
    levels_visit <- levels(frame[[spec$visit]])
    if (!identical(levels_visit, as.character(seq_along(levels_visit)))) stop("visit levels not 1..m: ", name)
    frame$visit_index <- as.integer(frame[[spec$visit]])
  }
  # rows sorted by subject and time, so that a subject's rows are in visit order in every nlme matrix
  frame <- frame[order(frame[[spec$subject]], frame[[spec$time]]), ]
  rownames(frame) <- NULL
  frame
}
frames <- lapply(setNames(names(datasets), names(datasets)), read_dataset)

# ------------------------------------------------------------------------------ model specifications

# One entry per (data set, model). `structure` is the residual structure, `random` the lme random part
# (NULL for gls), `mean` the fixed-effect formula, `term` the contract's notation.
structure_specs <- function(dataset) {
  spec <- datasets[[dataset]]
  id <- spec$subject
  time <- spec$time
  structures <- list()
  if (!is.null(spec$visit)) {
    for (s in c("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph")) {
      structures[[s]] <- list(structure = s, random = NULL, term = sprintf("%s(%s | %s)", s, spec$visit, id))
    }
  }
  structures$sp_exp <- list(structure = "sp_exp", random = NULL, term = sprintf("sp_exp(%s | %s)", time, id))
  if (!is.null(spec$visit)) {
    structures$ri_ar1 <- list(structure = "ar1", random = "~ 1",
                              term = sprintf("(1 | %s) + ar1(%s | %s)", id, spec$visit, id))
  }
  structures$ri_sp_exp <- list(structure = "sp_exp", random = "~ 1",
                               term = sprintf("(1 | %s) + sp_exp(%s | %s)", id, time, id))
  if (dataset != "cov_ovary") {
    structures$ris_sp_exp <- list(structure = "sp_exp", random = paste("~", time),
                                  term = sprintf("(%s | %s) + sp_exp(%s | %s)", time, id, time, id))
  }
  structures
}

mean_models <- list(
  # visit-structured residual models: the MMRM mean (visit as a factor) for the trial, age * Sex for Orthodont
  cov_sim_mmrm = list(residual = "y ~ visit * arm", random = "y ~ t * arm"),
  cov_orthodont = list(residual = "distance ~ age * Sex", random = "distance ~ age * Sex"),
  cov_ovary = list(residual = "follicles ~ sin(2*pi*Time) + cos(2*pi*Time)",
                   random = "follicles ~ sin(2*pi*Time) + cos(2*pi*Time)"),
  cov_sim_irregular = list(residual = "y ~ t * arm", random = "y ~ t * arm")
)

contract_k <- function(structure, m) {
  switch(structure, us = m * (m + 1) / 2, cs = 2, csh = m + 1, ar1 = 2, ar1h = m + 1, toep = m,
         toeph = 2 * m - 1, sp_exp = 2)
}

# cor_struct(): the nlme correlation object of a structure (common.R)
heterogeneous <- function(structure) structure %in% c("us", "csh", "ar1h", "toeph")
var_struct <- function(structure, value = NULL) {
  if (!heterogeneous(structure)) return(NULL)
  if (is.null(value)) varIdent(form = ~ 1 | visit) else varIdent(value = value, form = ~ 1 | visit)
}

# An alternative start per structure (the defaults are zero correlations / nlme's initial range).
alternative_start <- function(structure, m, frame, time) {
  base <- sub("h$", "", structure)
  if (structure == "us") return(rep(0.5, m * (m - 1) / 2))
  if (base %in% c("cs", "ar1")) return(0.5)
  if (base == "toep") return(c(0.6, rep(0, m - 2)))
  if (structure == "sp_exp") return(2 * stats::median(diff(sort(unique(frame[[time]])))))
  NULL
}

# ------------------------------------------------------------------------------ fitting

default_gls <- glsControl()
tight_gls <- glsControl(opt = "nlminb", maxIter = 500, msMaxIter = 2000, tolerance = 1e-10, returnObject = TRUE)
optim_gls <- glsControl(opt = "optim", optimMethod = "BFGS", maxIter = 500, msMaxIter = 2000, msTol = 1e-12,
                        tolerance = 1e-10, returnObject = TRUE)
default_lme <- lmeControl()
tight_lme <- lmeControl(maxIter = 500, msMaxIter = 2000, msMaxEval = 5000, niterEM = 100, tolerance = 1e-10,
                        returnObject = TRUE)
optim_lme <- lmeControl(opt = "optim", optimMethod = "BFGS", maxIter = 500, msMaxIter = 2000, niterEM = 100,
                        tolerance = 1e-10, returnObject = TRUE)
control_text <- list(
  default = "glsControl() / lmeControl() defaults: opt = \"nlminb\", maxIter 50, msMaxIter 200 (gls) / 50 (lme)",
  tight = paste("opt = \"nlminb\", maxIter 500, msMaxIter 2000, tolerance 1e-10, returnObject = TRUE",
                "(lme also msMaxEval 5000, niterEM 100)"),
  optim_bfgs = "opt = \"optim\", optimMethod = \"BFGS\", maxIter 500, msMaxIter 2000, tolerance 1e-10, returnObject = TRUE",
  alternative_start = "tight control, correlation started at alternative_start() instead of nlme's default",
  restart = "tight control, started at the best fit so far (correlation and variance parameters)"
)

fit_nlme <- function(dataset, model, method, control_name, cor_value = NULL, var_value = NULL) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  m <- if (is.null(spec$visit)) NA else nlevels(frame[[spec$visit]])
  id <- spec$subject
  correlation <- cor_struct(model$structure, id, spec$time, m, cor_value)
  weights <- var_struct(model$structure, var_value)
  method_name <- method
  if (is.null(model$random)) {
    control <- switch(control_name, default = default_gls, optim_bfgs = optim_gls, tight_gls)
    fixed <- as.formula(mean_models[[dataset]]$residual)
    capture(gls(fixed, data = frame, correlation = correlation, weights = weights, method = method_name,
                control = control))
  } else {
    control <- switch(control_name, default = default_lme, optim_bfgs = optim_lme, tight_lme)
    fixed <- as.formula(mean_models[[dataset]]$random)
    random <- as.formula(sprintf("%s | %s", model$random, id))
    capture(lme(fixed, data = frame, random = random, correlation = correlation, method = method_name,
                control = control))
  }
}

is_fit <- function(x) inherits(x, c("gls", "lme"))

start_values <- function(fit) {
  cs <- fit$modelStruct$corStruct
  vs <- fit$modelStruct$varStruct
  list(cor = unname(coef(cs, unconstrained = FALSE)),
       var = if (is.null(vs)) NULL else coef(vs, unconstrained = FALSE))
}

# Several optimizer settings and starts; the highest logLik is the reference.
fit_best <- function(dataset, model, method) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  m <- if (is.null(spec$visit)) NA else nlevels(frame[[spec$visit]])
  attempts <- list()
  fits <- list()
  add <- function(name, run) {
    fits[[name]] <<- run$value
    attempts[[length(attempts) + 1]] <<- list(
      name = name, control = control_text[[sub("_[0-9]+$", "", name)]],
      status = if (is_fit(run$value)) (if (length(run$messages)) "warning" else "ok") else "error",
      logLik = if (is_fit(run$value)) as.numeric(logLik(run$value)) else NULL,
      error = if (is_fit(run$value)) NULL else run$value$error,
      messages = as.list(run$messages), seconds = run$seconds)
  }
  add("default", fit_nlme(dataset, model, method, "default"))
  add("tight", fit_nlme(dataset, model, method, "tight"))
  add("optim_bfgs", fit_nlme(dataset, model, method, "optim_bfgs"))
  alt <- alternative_start(model$structure, m, frame, spec$time)
  if (!is.null(alt)) add("alternative_start", fit_nlme(dataset, model, method, "tight", cor_value = alt))
  best_name <- function() {
    ok <- names(fits)[vapply(fits, is_fit, TRUE)]
    if (!length(ok)) return(NULL)
    ok[which.max(vapply(fits[ok], function(f) as.numeric(logLik(f)), 0))]
  }
  # restarts from the best so far until the logLik no longer moves by 1e-9
  for (r in 1:3) {
    b <- best_name()
    if (is.null(b)) break
    sv <- start_values(fits[[b]])
    name <- paste0("restart_", r)
    add(name, fit_nlme(dataset, model, method, "tight", cor_value = sv$cor, var_value = sv$var))
    if (!is_fit(fits[[name]]) || as.numeric(logLik(fits[[name]])) < as.numeric(logLik(fits[[b]])) + 1e-9) break
  }
  b <- best_name()
  list(fit = if (is.null(b)) NULL else fits[[b]], reference_attempt = b, attempts = attempts,
       default = fits$default)
}

# ------------------------------------------------------------------------------ records

named_list <- function(x) lapply(as.list(x), function(v) v)

complete_subject <- function(frame, spec) {
  if (is.null(spec$visit)) return(NULL)
  m <- nlevels(frame[[spec$visit]])
  counts <- table(frame[[spec$subject]])
  as.character(names(counts)[counts == m][1])
}

# Marginal covariance of one subject's observations, in its rows' order.
subject_covariance <- function(fit, subject) {
  if (inherits(fit, "gls")) {
    if (is.null(fit$modelStruct$varStruct) && sum(getGroups(fit) == subject) == 1) {
      # getVarCov.gls fails on a one-visit subject for corExp ("invalid 'times' argument"): its variance
      return(matrix(fit$sigma^2, 1, 1))
    }
    unclass(getVarCov(fit, individual = subject))[, , drop = FALSE]
  } else {
    # Z G Z' + sigma^2 R (getVarCov.lme fails on one-visit subjects; it agrees elsewhere, checked below)
    frame <- getData(fit)
    rows <- which(getGroups(fit) == subject)
    Z <- model.matrix(formula(fit$modelStruct$reStruct)[[1]], frame[rows, , drop = FALSE])
    G <- as.matrix(getVarCov(fit))
    R <- if (length(rows) == 1) matrix(1, 1, 1) else corMatrix(fit$modelStruct$corStruct)[[subject]]
    Z %*% G %*% t(Z) + fit$sigma^2 * R
  }
}
lme_marginal_check <- function(fit, subject) {
  max(abs(subject_covariance(fit, subject) -
            matrix(as.numeric(getVarCov(fit, individuals = subject, type = "marginal")[[1]]),
                   sum(getGroups(fit) == subject))))
}

plain_matrix <- function(x) {
  x <- as.matrix(x)
  matrix(as.numeric(x), nrow(x), dimnames = NULL)
}

# logLik from the textbook formulas with nlme's fitted V_i (ML: -1/2 [n log 2 pi + log|V| + r'V^-1 r];
# REML: -1/2 [(n - p) log 2 pi + log|V| + log|X'V^-1X| + r'V^-1 r]) and the textbook (X'V^-1X)^-1.
textbook <- function(fit, frame, spec, fixed_formula, method) {
  X <- model.matrix(as.formula(fixed_formula), frame)
  y <- frame[[spec$outcome]]
  beta <- if (inherits(fit, "gls")) coef(fit) else fixef(fit)
  r <- y - as.vector(X %*% beta[colnames(X)])
  logdet <- 0
  quad <- 0
  XtVX <- matrix(0, ncol(X), ncol(X))
  for (s in levels(frame[[spec$subject]])) {
    rows <- which(frame[[spec$subject]] == s)
    V <- subject_covariance(fit, s)
    Vi <- solve(V)
    logdet <- logdet + as.numeric(determinant(V)$modulus)
    quad <- quad + sum(r[rows] * (Vi %*% r[rows]))
    XtVX <- XtVX + t(X[rows, , drop = FALSE]) %*% Vi %*% X[rows, , drop = FALSE]
  }
  n <- nrow(X)
  p <- ncol(X)
  ll_ml <- -0.5 * (n * log(2 * pi) + logdet + quad)
  ll_reml <- -0.5 * ((n - p) * log(2 * pi) + logdet + as.numeric(determinant(XtVX)$modulus) + quad)
  half_logdet_XtX <- 0.5 * as.numeric(determinant(crossprod(X))$modulus)
  vc <- solve(XtVX)
  nlme_vcov <- as.matrix(vcov(fit))[colnames(X), colnames(X)]
  list(
    logLik_ML_formula = ll_ml, logLik_REML_formula = ll_reml,
    half_log_det_XtX = half_logdet_XtX,
    nlme_minus_formula = as.numeric(logLik(fit)) - (if (method == "ML") ll_ml else ll_reml),
    std_error_formula = named_list(setNames(sqrt(diag(vc)), colnames(X))),
    nlme_vcov_over_formula = mean(diag(nlme_vcov) / diag(vc)),
    n_over_n_minus_p = n / (n - p)
  )
}

structure_parameters <- function(structure, cov) {
  sd <- sqrt(diag(cov))
  corr <- cov / outer(sd, sd)
  m <- nrow(cov)
  lag_corr <- if (m > 1) corr[1, 2:m] else numeric(0)
  switch(
    structure,
    us = list(sd = I(sd), correlation_lower = I(corr[lower.tri(corr)])),
    cs = list(variance = cov[1, 1], rho = corr[1, 2]),
    csh = list(sd = I(sd), rho = corr[1, 2]),
    ar1 = list(variance = cov[1, 1], phi = corr[1, 2]),
    ar1h = list(sd = I(sd), phi = corr[1, 2]),
    toep = list(variance = cov[1, 1], rho_by_lag = I(lag_corr)),
    toeph = list(sd = I(sd), rho_by_lag = I(lag_corr)),
    list()
  )
}

fit_record <- function(dataset, name, model, method, best) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  fit <- best$fit
  is_gls <- is.null(model$random)
  fixed_formula <- if (is_gls) mean_models[[dataset]]$residual else mean_models[[dataset]]$random
  call_text <- paste(deparse(fit$call, width.cutoff = 500), collapse = " ")
  base <- list(term = model$term, mean = fixed_formula, method = method,
               engine = if (is_gls) "nlme::gls" else "nlme::lme")
  if (is.null(fit)) {
    return(c(base, list(status = "error", attempts = best$attempts)))
  }
  ll <- logLik(fit)
  n <- nrow(frame)
  p <- length(if (is_gls) coef(fit) else fixef(fit))
  k <- as.integer(attr(ll, "df"))
  n_subjects <- nlevels(frame[[spec$subject]])
  beta <- if (is_gls) coef(fit) else fixef(fit)
  vcov_beta <- as.matrix(vcov(fit))
  se <- sqrt(diag(vcov_beta))
  m <- if (is.null(spec$visit)) NA else nlevels(frame[[spec$visit]])
  cs <- fit$modelStruct$corStruct
  vs <- fit$modelStruct$varStruct
  nlme_parameters <- list(
    corStruct_class = class(cs)[1],
    corStruct = named_list(coef(cs, unconstrained = FALSE)),
    corStruct_unconstrained = I(unname(coef(cs, unconstrained = TRUE))),
    varStruct = if (is.null(vs)) NULL else named_list(coef(vs, unconstrained = FALSE)),
    varStruct_unconstrained = if (is.null(vs)) NULL else I(unname(coef(vs, unconstrained = TRUE))),
    varIdent_reference_level = if (is.null(vs)) NULL else
      setdiff(levels(frame[[spec$visit]]), names(coef(vs, unconstrained = FALSE))),  # sd ratios are to this level
    nugget = if (inherits(cs, "corSpatial")) attr(cs, "nugget") else NULL,
    sigma = fit$sigma
  )
  if (!is_gls) {
    nlme_parameters$reStruct_unconstrained <- named_list(coef(fit$modelStruct$reStruct, unconstrained = TRUE))
  }
  record <- c(base, list(
    status = if (length(Filter(function(a) a$name == best$reference_attempt, best$attempts)[[1]]$messages))
      "warning" else "ok",
    call = call_text,
    reference_attempt = best$reference_attempt,
    optimizer = control_text[[sub("_[0-9]+$", "", best$reference_attempt)]],
    logLik = as.numeric(ll),
    df = k,
    contract_k_check = if (is_gls && !is.na(m)) (k == p + contract_k(model$structure, m) ||
                                                   (model$structure == "sp_exp" && k == p + 2)) else
      if (is_gls) k == p + 2 else NULL,
    AIC = AIC(fit),
    BIC = BIC(fit),
    BIC_n = if (method == "REML") n - p else n,
    BIC_rows = -2 * as.numeric(ll) + log(n) * k,
    BIC_rows_minus_p = -2 * as.numeric(ll) + log(n - p) * k,
    BIC_subjects = -2 * as.numeric(ll) + log(n_subjects) * k,
    nobs = n, n_subjects = n_subjects, p = p,
    fixed_effects = lapply(setNames(seq_along(beta), names(beta)),
                           function(i) list(estimate = unname(beta[[i]]), std_error = unname(se[[i]]))),
    vcov = unname(vcov_beta),
    sigma = fit$sigma,
    nlme_parameters = nlme_parameters,
    apVar = if (is.character(fit$apVar)) fit$apVar else "ok",
    numIter = if (is_gls) fit$numIter else NULL
  ))
  if (!is_gls) {
    several <- names(which(table(getGroups(fit)) > 1))[1]
    record$marginal_covariance_check <- list(subject = several, max_abs_difference_from_getVarCov =
                                               lme_marginal_check(fit, several))
    G <- getVarCov(fit)
    record$random_effects <- list(terms = I(colnames(G)), covariance = plain_matrix(G),
                                  sd = I(unname(sqrt(diag(as.matrix(G))))))
  }
  # covariance of a subject's visits on the full visit grid (a subject seen at every visit)
  full <- complete_subject(frame, spec)
  if (!is.null(full)) {
    rows <- which(frame[[spec$subject]] == full)
    cov <- plain_matrix(subject_covariance(fit, full))
    sd <- sqrt(diag(cov))
    record$covariance <- list(
      subject = full, visits = I(as.character(frame[[spec$visit]][rows])), times = I(frame[[spec$time]][rows]),
      matrix = cov, sd = I(sd), correlation = cov / outer(sd, sd))
    record$parameters <- structure_parameters(if (is_gls) model$structure else "none", cov)
    # a subject with a missed visit in the middle: its covariance is the full-grid one restricted to its
    # visits (checks that nlme places the visits by visit_index, gaps included)
    gap_subject <- NULL
    for (s in levels(frame[[spec$subject]])) {
      idx <- frame$visit_index[frame[[spec$subject]] == s]
      if (length(idx) >= 2 && any(diff(idx) > 1)) {
        gap_subject <- s
        break
      }
    }
    if (!is.null(gap_subject)) {
      idx <- frame$visit_index[frame[[spec$subject]] == gap_subject]
      record$gap_check <- list(subject = gap_subject, visit_index = I(idx),
                               max_abs_difference = max(abs(subject_covariance(fit, gap_subject) -
                                                              cov[idx, idx])))
    }
  } else {
    first <- levels(frame[[spec$subject]])[1]
    rows <- which(frame[[spec$subject]] == first)
    record$covariance <- list(subject = first, times = I(frame[[spec$time]][rows]),
                              matrix = plain_matrix(subject_covariance(fit, first)))
  }
  if (model$structure == "sp_exp") {
    range <- unname(coef(cs, unconstrained = FALSE)[["range"]])
    record$parameters <- c(record$parameters, list(range = range, residual_variance = fit$sigma^2,
                                                   correlation_at_distance_1 = exp(-1 / range)))
  }
  if (name == "ri_ar1") {
    record$parameters <- c(record$parameters, list(phi = unname(coef(cs, unconstrained = FALSE))[1],
                                                   residual_variance = fit$sigma^2))
  }
  record$textbook_check <- textbook(fit, frame, spec, fixed_formula, method)
  record$default_fit <- if (is_fit(best$default)) list(
    logLik = as.numeric(logLik(best$default)),
    max_abs_fixed_effect_difference = max(abs((if (is_gls) coef(best$default) else fixef(best$default)) - beta))
  ) else list(error = best$default$error)
  record$attempts <- best$attempts
  record
}

# An independent optimum for the homogeneous ar1 / sp_exp models with or without random effects: the
# marginal likelihood written out (V_i = Z_i G Z_i' + sigma^2 R_i, beta profiled out; REML adds
# log|X'V^-1X| and uses n - p in the 2 pi term), G by its log-Cholesky factor, log sigma^2, atanh(phi) or
# log(range); nlminb from nlme's estimates, again from its end point, then Nelder-Mead. nlme's own nlminb
# stops up to 5e-5 logLik units short on some random-effect + sp_exp fits (see `direct_optimum`).
direct_optimum <- function(dataset, model, method, fit) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  is_gls <- is.null(model$random)
  fixed_formula <- if (is_gls) mean_models[[dataset]]$residual else mean_models[[dataset]]$random
  X <- model.matrix(as.formula(fixed_formula), frame)
  y <- frame[[spec$outcome]]
  n <- nrow(X)
  p <- ncol(X)
  position <- if (model$structure == "ar1") frame$visit_index else frame[[spec$time]]
  Z <- if (is_gls) NULL else model.matrix(as.formula(model$random), frame)
  q <- if (is_gls) 0 else ncol(Z)
  groups <- split(seq_len(n), frame[[spec$subject]])
  reml <- method == "REML"
  unpack <- function(par) {
    G <- NULL
    if (q > 0) {
      L <- matrix(0, q, q)
      L[lower.tri(L, diag = TRUE)] <- par[seq_len(q * (q + 1) / 2)]
      diag(L) <- exp(diag(L))
      G <- L %*% t(L)
    }
    rest <- if (q > 0) par[-seq_len(q * (q + 1) / 2)] else par
    list(G = G, sigma2 = exp(rest[1]),
         corr = if (model$structure == "ar1") tanh(rest[2]) else exp(rest[2]))
  }
  pieces <- function(par) {
    u <- unpack(par)
    logdet <- 0
    XtVX <- matrix(0, p, p)
    XtVy <- numeric(p)
    whitened <- vector("list", length(groups))
    for (j in seq_along(groups)) {
      g <- groups[[j]]
      lag <- abs(outer(position[g], position[g], "-"))
      R <- if (model$structure == "ar1") u$corr^lag else exp(-lag / u$corr)
      V <- u$sigma2 * R
      if (q > 0) V <- V + Z[g, , drop = FALSE] %*% u$G %*% t(Z[g, , drop = FALSE])
      C <- chol(V)
      logdet <- logdet + 2 * sum(log(diag(C)))
      Xw <- backsolve(C, X[g, , drop = FALSE], transpose = TRUE)
      yw <- backsolve(C, y[g], transpose = TRUE)
      whitened[[j]] <- list(Xw, yw)
      XtVX <- XtVX + crossprod(Xw)
      XtVy <- XtVy + as.vector(crossprod(Xw, yw))
    }
    beta <- solve(XtVX, XtVy)
    quad <- sum(vapply(whitened, function(w) sum((w[[2]] - w[[1]] %*% beta)^2), 0))
    ll <- if (reml) {
      -0.5 * ((n - p) * log(2 * pi) + logdet + as.numeric(determinant(XtVX)$modulus) + quad)
    } else {
      -0.5 * (n * log(2 * pi) + logdet + quad)
    }
    list(logLik = ll, beta = beta, vcov = solve(XtVX), u = u)
  }
  objective <- function(par) {
    value <- tryCatch(-pieces(par)$logLik, error = function(e) Inf)
    if (is.finite(value)) value else 1e300
  }
  # start: nlme's estimates
  cs <- unname(coef(fit$modelStruct$corStruct, unconstrained = FALSE))[1]
  start <- c(if (q > 0) {
    L <- t(chol(as.matrix(getVarCov(fit)) + diag(1e-10, q)))
    diag(L) <- log(diag(L))
    L[lower.tri(L, diag = TRUE)]
  }, log(fit$sigma^2), if (model$structure == "ar1") atanh(cs) else log(cs))
  t0 <- proc.time()[["elapsed"]]
  o1 <- nlminb(start, objective, control = list(rel.tol = 1e-14, eval.max = 4000, iter.max = 2000))
  o2 <- nlminb(o1$par, objective, control = list(rel.tol = 1e-14, eval.max = 4000, iter.max = 2000))
  o3 <- optim(o2$par, objective, method = "Nelder-Mead", control = list(maxit = 3000, reltol = 1e-15))
  best <- list(o1$par, o2$par, o3$par)[[which.min(c(o1$objective, o2$objective, o3$value))]]
  at <- pieces(best)
  k <- p + q * (q + 1) / 2 + 2
  names(at$beta) <- colnames(X)
  list(
    how = paste("marginal likelihood written out in R (direct_optimum()), nlminb twice from nlme's estimates",
                "then Nelder-Mead; fixed effects by GLS at the optimum, std_error from (X'V^-1X)^-1"),
    logLik = at$logLik, minus_nlme = at$logLik - as.numeric(logLik(fit)), df = k,
    AIC = -2 * at$logLik + 2 * k,
    BIC_nlme_convention = -2 * at$logLik + log(if (reml) n - p else n) * k,
    fixed_effects = lapply(setNames(seq_along(at$beta), colnames(X)), function(i)
      list(estimate = at$beta[[i]], std_error = sqrt(at$vcov[i, i]))),
    random_effects_covariance = if (q > 0) at$u$G else NULL,
    residual_variance = at$u$sigma2, sigma = sqrt(at$u$sigma2),
    phi = if (model$structure == "ar1") at$u$corr else NULL,
    range = if (model$structure == "sp_exp") at$u$corr else NULL,
    objective_values = c(-o1$objective, -o2$objective, -o3$value),
    seconds = proc.time()[["elapsed"]] - t0
  )
}

# Boundary and identifiability flags: a random-effect SD below 1e-2 sigma; an sp_exp range below a quarter of
# the smallest spacing between distinct times (distinct times then uncorrelated: the range is not identified).
fit_notes <- function(rec, frame, spec) {
  notes <- character()
  if (is.null(rec$logLik)) return(list())
  if (!is.null(rec$random_effects) && any(rec$random_effects$sd < 1e-2 * rec$sigma)) {
    notes <- c(notes, "random-effect variance at the boundary (about 0): compare logLik, not that variance")
  }
  if (!is.null(rec$parameters$range)) {
    spacing <- min(diff(sort(unique(frame[[spec$time]]))))
    if (rec$parameters$range < spacing / 4) {
      notes <- c(notes, paste("sp_exp range below a quarter of the smallest time spacing: correlations between",
                              "distinct times about 0, the range itself is not identified"))
    }
  }
  if (rec$reference_source == "direct_optimum") {
    notes <- c(notes, sprintf("nlme stops %.2g logLik units short of the direct optimum (reference_source)",
                              rec$direct_optimum$minus_nlme))
  }
  if (rec$apVar != "ok") notes <- c(notes, paste("nlme apVar:", rec$apVar))
  as.list(notes)
}

fits <- list()
fitted_models <- list()  # the nlme objects behind `fits`, for the per-row checks of section (e)
for (dataset in names(datasets)) {
  models <- structure_specs(dataset)
  fits[[dataset]] <- list()
  fitted_models[[dataset]] <- list()
  for (name in names(models)) {
    fits[[dataset]][[name]] <- list()
    fitted_models[[dataset]][[name]] <- list()
    for (method in c("ML", "REML")) {
      best <- fit_best(dataset, models[[name]], method)
      fitted_models[[dataset]][[name]][[method]] <- best$fit
      rec <- fit_record(dataset, name, models[[name]], method, best)
      if (!is.null(best$fit) && !heterogeneous(models[[name]]$structure) &&
          models[[name]]$structure %in% c("ar1", "sp_exp")) {
        rec$direct_optimum <- direct_optimum(dataset, models[[name]], method, best$fit)
        rec$reference_source <- if (rec$direct_optimum$minus_nlme > 1e-6) "direct_optimum" else "nlme"
      } else {
        rec$reference_source <- "nlme"
      }
      rec$notes <- fit_notes(rec, frames[[dataset]], datasets[[dataset]])
      fits[[dataset]][[name]][[method]] <- rec
      cat(sprintf("%-18s %-11s %-4s %-7s logLik %.6f df %2d (best: %-17s default %s) %.1fs\n", dataset, name,
                  method, rec$status, if (is.null(rec$logLik)) NA else rec$logLik,
                  if (is.null(rec$df)) NA else rec$df, rec$reference_attempt,
                  if (is.null(rec$default_fit$logLik)) "error" else sprintf("%+.2e", rec$default_fit$logLik -
                                                                             rec$logLik),
                  sum(vapply(best$attempts, function(a) a$seconds, 0))))
      if (!is.null(rec$direct_optimum)) {
        cat(sprintf("%47s direct optimum %.6f (%+.2e vs nlme) %.1fs\n", "", rec$direct_optimum$logLik,
                    rec$direct_optimum$minus_nlme, rec$direct_optimum$seconds))
      }
      for (note in rec$notes) cat(sprintf("%47s note: %s\n", "", note))
    }
  }
}

# ------------------------------------------------------------------------------ cross-checks

# (a) compound symmetry with positive correlation = random intercept: gls cs, lme (1 | id), lmer (1 | id)
cs_vs_ri <- list()
for (dataset in c("cov_sim_mmrm", "cov_orthodont")) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  fixed <- mean_models[[dataset]]$residual
  cs_vs_ri[[dataset]] <- list()
  for (method in c("ML", "REML")) {
    cs_fit <- fits[[dataset]]$cs[[method]]
    lmer_formula <- sprintf("%s + (1 | %s)", fixed, spec$subject)
    lmer_run <- capture(lmer(as.formula(lmer_formula), data = frame, REML = method == "REML"))
    lme_run <- capture(lme(as.formula(fixed), data = frame, random = as.formula(sprintf("~ 1 | %s", spec$subject)),
                           method = method))
    lf <- lmer_run$value
    vc <- as.data.frame(VarCorr(lf))
    tau2 <- vc$vcov[vc$grp == spec$subject]
    sigma2 <- sigma(lf)^2
    cs_vs_ri[[dataset]][[method]] <- list(
      gls_cs_logLik = cs_fit$logLik, gls_cs_rho = cs_fit$parameters$rho, gls_cs_variance = cs_fit$parameters$variance,
      lmer_formula = lmer_formula, lmer_logLik = as.numeric(logLik(lf)), lmer_df = as.integer(attr(logLik(lf), "df")),
      lmer_messages = as.list(lmer_run$messages),
      lmer_intercept_variance = tau2, lmer_residual_variance = sigma2, lmer_rho = tau2 / (tau2 + sigma2),
      lmer_fixed_effects = lapply(as.list(fixef(lf)), function(v) v),
      lmer_std_errors = named_list(setNames(sqrt(diag(as.matrix(vcov(lf)))), names(fixef(lf)))),
      lme_logLik = as.numeric(logLik(lme_run$value)), lme_messages = as.list(lme_run$messages),
      gls_minus_lmer = cs_fit$logLik - as.numeric(logLik(lf))
    )
    cat(sprintf("cs vs ri %-16s %-4s gls %.6f lmer %.6f lme %.6f\n", dataset, method, cs_fit$logLik,
                as.numeric(logLik(lf)), as.numeric(logLik(lme_run$value))))
  }
}

# (b) glmmTMB: us() = us, toep() = toeph, cs() = csh, ar1() = ar1 (all with dispformula = ~0, whose residual
# variance is fixed at a negligible value, so its df has no sigma)
tmb_terms <- c(us = "us", toeph = "toep", csh = "cs", ar1 = "ar1")
tmb <- list()
for (dataset in c("cov_sim_mmrm", "cov_orthodont")) {
  spec <- datasets[[dataset]]
  frame <- frames[[dataset]]
  tmb[[dataset]] <- list()
  for (structure in names(tmb_terms)) {
    tmb[[dataset]][[structure]] <- list()
    for (method in c("ML", "REML")) {
      formula <- sprintf("%s + %s(%s + 0 | %s)", mean_models[[dataset]]$residual, tmb_terms[[structure]],
                         spec$visit, spec$subject)
      run <- capture(glmmTMB(as.formula(formula), data = frame, dispformula = ~0, REML = method == "REML"))
      g <- run$value
      if (!inherits(g, "glmmTMB")) {
        tmb[[dataset]][[structure]][[method]] <- list(formula = formula, status = "error", error = g$error)
        next
      }
      ll <- logLik(g)
      vc <- VarCorr(g)$cond[[1]]
      beta <- fixef(g)$cond
      se <- sqrt(diag(vcov(g)$cond))
      ref <- fits[[dataset]][[structure]][[method]]
      tmb[[dataset]][[structure]][[method]] <- list(
        formula = formula, call = sprintf("glmmTMB(%s, dispformula = ~0, REML = %s)", formula, method == "REML"),
        status = if (length(run$messages)) "warning" else "ok", messages = as.list(run$messages),
        logLik = as.numeric(ll), df = as.integer(attr(ll, "df")),
        covariance = plain_matrix(vc),
        fixed_effects = lapply(setNames(seq_along(beta), names(beta)),
                               function(i) list(estimate = unname(beta[[i]]), std_error = unname(se[[i]]))),
        nlme_logLik = ref$logLik, tmb_minus_nlme = as.numeric(ll) - ref$logLik,
        max_abs_covariance_difference = max(abs(plain_matrix(vc) - ref$covariance$matrix)),
        max_abs_fixed_effect_difference = max(abs(beta - vapply(ref$fixed_effects, function(e) e$estimate, 0)[names(beta)])),
        seconds = run$seconds
      )
      cat(sprintf("glmmTMB %-16s %-6s %-4s logLik %.6f (nlme %.6f) %s %.1fs\n", dataset, structure, method,
                  as.numeric(ll), ref$logLik, paste(run$messages, collapse = "; "), run$seconds))
    }
  }
}

# (c) on an equally spaced grid, sp_exp over the time = ar1 over the visit index with phi = exp(-step / range)
sp_vs_ar1 <- list()
for (dataset in c("cov_sim_mmrm", "cov_orthodont")) {
  step <- unique(diff(sort(unique(frames[[dataset]][[datasets[[dataset]]$time]]))))
  sp_vs_ar1[[dataset]] <- lapply(list(ML = "ML", REML = "REML"), function(method) {
    a <- fits[[dataset]]$ar1[[method]]
    s <- fits[[dataset]]$sp_exp[[method]]
    list(time_step = step, ar1_logLik = a$logLik, sp_exp_logLik = s$logLik, ar1_phi = a$parameters$phi,
         exp_minus_step_over_range = exp(-step / s$parameters$range))
  })
}

# (d) a pitfall: corAR1 over the raw times 8, 10, 12, 14 (not the visit index) of Orthodont
pitfall_run <- capture(gls(distance ~ age * Sex, data = frames$cov_orthodont,
                           correlation = corAR1(form = ~ age | Subject), method = "ML"))
pitfall <- list(
  call = "gls(distance ~ age * Sex, data = cov_orthodont, correlation = corAR1(form = ~ age | Subject), method = \"ML\")",
  logLik = as.numeric(logLik(pitfall_run$value)),
  Phi = unname(coef(pitfall_run$value$modelStruct$corStruct, unconstrained = FALSE)),
  messages = as.list(pitfall_run$messages),
  note = paste("corAR1 over a time with steps of 2 does not fit AR(1) over the visits: use the integer visit",
               "index (ar1 here) or corExp over the time (sp_exp)")
)

# (e) per row and per subject, for a few fits: nlme's normalized residuals (residuals(fit, type = "normalized"):
# the residuals (conditional on the random effects for lme, at the subject level) divided by their SD and
# premultiplied by the inverse Cholesky factor of the residual correlation matrix), the subject-level fitted
# values and residuals, and the random effects' conditional modes (ranef). Rows are named by subject and time.
row_checks <- list(
  list(dataset = "cov_sim_mmrm", model = "us", method = "REML"),
  list(dataset = "cov_orthodont", model = "ar1h", method = "ML"),
  list(dataset = "cov_orthodont", model = "ri_ar1", method = "REML"),
  list(dataset = "cov_ovary", model = "ri_sp_exp", method = "REML"),
  list(dataset = "cov_sim_irregular", model = "ris_sp_exp", method = "ML")
)
per_row <- lapply(row_checks, function(check) {
  spec <- datasets[[check$dataset]]
  frame <- frames[[check$dataset]]
  fit <- fitted_models[[check$dataset]][[check$model]][[check$method]]
  is_gls <- inherits(fit, "gls")
  # nlme keeps the rows in the data's order here (frames are sorted by subject and time)
  record <- list(
    dataset = check$dataset, model = check$model, method = check$method, logLik = as.numeric(logLik(fit)),
    call = if (is_gls) "residuals(fit, type = \"normalized\"); fitted(fit); residuals(fit)" else
      "residuals(fit, type = \"normalized\"); fitted(fit) and residuals(fit) at level 1 (subject); ranef(fit)",
    subject = I(as.character(frame[[spec$subject]])), time = I(frame[[spec$time]]),
    normalized_residuals = I(unname(as.numeric(residuals(fit, type = "normalized")))),
    fitted = I(unname(as.numeric(fitted(fit)))), residuals = I(unname(as.numeric(residuals(fit))))
  )
  if (!is_gls) {
    modes <- ranef(fit)
    record$ranef <- list(subjects = I(rownames(modes)), terms = I(colnames(modes)), modes = unname(as.matrix(modes)))
  }
  record
})

# ------------------------------------------------------------------------------ write

dataset_records <- lapply(setNames(names(datasets), names(datasets)), function(name) {
  spec <- datasets[[name]]
  frame <- frames[[name]]
  per_subject <- table(frame[[spec$subject]])
  rec <- list(file = file.path("data", paste0(name, ".csv")), source = spec$source, subject = spec$subject,
              visit = spec$visit, time = spec$time, outcome = spec$outcome, factors = as.list(spec$factors),
              nrow = nrow(frame), n_subjects = length(per_subject),
              observations_per_subject = named_list(table(as.integer(per_subject))),
              columns = as.list(setdiff(names(frame), "visit_index")),
              mean_residual_models = mean_models[[name]]$residual,
              mean_random_effect_models = mean_models[[name]]$random)
  if (!is.null(spec$visit)) {
    rec$visit_levels <- levels(frame[[spec$visit]])
    rec$visit_counts <- named_list(table(frame[[spec$visit]]))
  }
  rec
})
truth <- mmrm_truth()
dataset_records$cov_sim_mmrm$truth <- list(covariance = truth$covariance, sd = truth$sd,
                                           correlation = truth$correlation, mean_control = truth$mean_control,
                                           effect_treatment = truth$effect_treatment)

reference <- list(
  generated_by = "Rscript tests/reference/make_reference_covariance.R",
  R_version = R.version.string,
  nlme_version = as.character(packageVersion("nlme")),
  lme4_version = as.character(packageVersion("lme4")),
  glmmTMB_version = as.character(packageVersion("glmmTMB")),
  TMB_version = as.character(packageVersion("TMB")),
  Matrix_version = as.character(packageVersion("Matrix")),
  jsonlite_version = as.character(packageVersion("jsonlite")),
  seconds = as.numeric(difftime(Sys.time(), started, units = "secs")),
  not_covered = list(
    ad = "ante-dependence (mmrm's ad): no implementation in R packages available from Debian (mmrm is not packaged)",
    adh = "heterogeneous ante-dependence (mmrm's adh): as ad"
  ),
  datasets = dataset_records,
  fits = fits,
  cross_checks = list(cs_vs_random_intercept = cs_vs_ri, glmmTMB = tmb, sp_exp_vs_ar1_on_regular_grid = sp_vs_ar1,
                      corAR1_over_raw_time_pitfall = pitfall),
  per_row = per_row
)
out <- file.path(ref_dir, "nlme_reference_covariance.json")
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"), out)
cat("wrote", out, sprintf("(%.0f s)\n", reference$seconds))
