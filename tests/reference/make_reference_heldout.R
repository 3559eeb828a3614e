# Held-out reference numbers for issue 13: public longitudinal data sets the structured-covariance engine was
# not developed on (nlme::Oxboys, nlme::BodyWeight, lme4::sleepstudy), every structure of the contract that R
# implements, fitted by nlme (gls / lme), plus the lme4-style candidates by lmer, and the choice by AIC and
# by BIC among all of them.
#
# Run from the repository root:   Rscript tests/reference/make_reference_heldout.R
# Needs R with nlme, lme4 and jsonlite (Debian: r-cran-nlme r-cran-lme4 r-cran-jsonlite). About a minute.
#
# Writes tests/reference/data/heldout_*.csv (factors as plain text) and tests/reference/nlme_reference_heldout.json:
# fits[dataset][model][ML|REML] = logLik, df, AIC, BIC (n = rows, nlme's ML convention and lme4's), and for ML
# the best model by AIC and by BIC among the models of the data set. Each nlme model is fitted from several
# optimizer settings (nlminb default and tight, optim BFGS) and restarts; the highest logLik is the reference,
# among the attempts whose logLik is the likelihood written from its definition at their estimates (see
# definition_loglik(): nlme's optim reaches a corExp range of 1e20 on Oxboys, where it reports -331.93 for a
# singular covariance; the likelihood there is far lower).
#
# The nlme forms of the contract's terms (m = number of visits, visit_index = position 1..m of the visit):
#   us / cs / csh / ar1 / ar1h / toep / toeph(visit | id): corSymm / corCompSymm / corAR1 / corARMA(p = m - 1)
#     over ~ visit_index | id, with varIdent(~ 1 | visit) for the heterogeneous ones (us, csh, ar1h, toeph)
#   sp_exp(time | id): corExp(form = ~ time | id)
#   (1 | id) + ar1(visit | id):  lme(random = ~ 1 | id, correlation = corAR1(form = ~ visit_index | id))
#   (1 | id) + sp_exp(time | id), (time | id) + sp_exp(time | id): lme with corExp(form = ~ time | id)
# us is left out where the subjects are too few for m(m+1)/2 covariance parameters (BodyWeight: 16 rats,
# 11 visits; sleepstudy: 18 subjects, 10 days).

suppressPackageStartupMessages({
  library(nlme)
  library(lme4)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
started <- Sys.time()
source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

sleep <- as_plain(lme4::sleepstudy, c("Subject", "Days", "Reaction"))
datasets <- list(
  heldout_oxboys = list(
    frame = as_plain(nlme::Oxboys, c("Subject", "age", "height", "Occasion")),
    source = "nlme::Oxboys (26 boys, 9 occasions; age is centred and differs between boys at an occasion)",
    subject = "Subject", visit = "Occasion", time = "age", outcome = "height",
    mean = "height ~ age + I(age^2)", slope = "age",
    structures = c("us", "cs", "csh", "ar1", "ar1h", "toep", "toeph")),
  heldout_bodyweight = list(
    frame = as_plain(nlme::BodyWeight, c("Rat", "Diet", "Time", "weight")),
    source = "nlme::BodyWeight (16 rats, 3 diets, weighed on days 1, 8, ..., 43, 44, ..., 64: unequal spacing)",
    subject = "Rat", visit = "Time", time = "Time", outcome = "weight",
    mean = "weight ~ Time * Diet", slope = "Time",
    structures = c("cs", "csh", "ar1", "ar1h", "toep", "toeph")),
  heldout_sleepstudy = list(
    frame = sleep,
    source = "lme4::sleepstudy (18 subjects, days 0..9)",
    subject = "Subject", visit = "Days", time = "Days", outcome = "Reaction",
    mean = "Reaction ~ Days", slope = "Days",
    structures = c("cs", "csh", "ar1", "ar1h", "toep", "toeph"))
)

for (name in names(datasets)) {
  write.csv(datasets[[name]]$frame, file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

read_back <- function(name) {
  spec <- datasets[[name]]
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  frame[[spec$subject]] <- factor(as.character(frame[[spec$subject]]))
  if (!is.null(frame$Diet)) frame$Diet <- factor(as.character(frame$Diet))
  visits <- sort(unique(frame[[spec$visit]]))
  frame$visit_index <- match(frame[[spec$visit]], visits)
  frame$visit_factor <- factor(frame$visit_index)
  frame <- frame[order(frame[[spec$subject]], frame[[spec$visit]]), ]
  rownames(frame) <- NULL
  frame
}

heterogeneous <- function(s) s %in% c("us", "csh", "ar1h", "toeph")

controls <- list(
  gls = list(default = glsControl(),
             tight = glsControl(opt = "nlminb", maxIter = 500, msMaxIter = 2000, tolerance = 1e-10, returnObject = TRUE),
             optim = glsControl(opt = "optim", optimMethod = "BFGS", maxIter = 500, msMaxIter = 2000, msTol = 1e-12,
                                tolerance = 1e-10, returnObject = TRUE)),
  lme = list(default = lmeControl(),
             tight = lmeControl(maxIter = 500, msMaxIter = 2000, msMaxEval = 5000, niterEM = 100, tolerance = 1e-10,
                                returnObject = TRUE),
             optim = lmeControl(opt = "optim", optimMethod = "BFGS", maxIter = 500, msMaxIter = 2000, niterEM = 100,
                                tolerance = 1e-10, returnObject = TRUE))
)

fit_once <- function(frame, spec, model, method, control, cor_value = NULL, var_value = NULL) {
  m <- max(frame$visit_index)
  correlation <- cor_struct(model$structure, spec$subject, spec$time, m, cor_value)
  weights <- if (heterogeneous(model$structure)) {
    if (is.null(var_value)) varIdent(form = ~ 1 | visit_factor) else varIdent(value = var_value, form = ~ 1 | visit_factor)
  } else NULL
  fixed <- as.formula(spec$mean)
  if (is.null(model$random)) {
    capture(gls(fixed, data = frame, correlation = correlation, weights = weights, method = method,
                control = controls$gls[[control]]))
  } else {
    random <- as.formula(sprintf("%s | %s", model$random, spec$subject))
    capture(lme(fixed, data = frame, random = random, correlation = correlation, weights = weights,
                method = method, control = controls$lme[[control]]))
  }
}

is_fit <- function(x) inherits(x, c("gls", "lme"))

# The log-likelihood written from its definition at nlme's estimates: subject by subject, V_i = Z_i G Z_i' +
# sigma^2 R_i (lme) or the gls covariance, ML: -1/2 [n log 2 pi + log|V| + r'V^-1 r], REML adds log|X'V^-1X|
# and uses n - p. nlme can report a logLik that is not the likelihood at its own estimates: with corExp at a
# range of 1e20, R_i is a matrix of ones in floating point (singular) and nlme still returns a number.
# Such an attempt is not a maximum of the likelihood and is left out (`definition_check`).
definition_loglik <- function(fit, frame, spec, method) {
  X <- model.matrix(as.formula(spec$mean), frame)
  y <- frame[[spec$outcome]]
  beta <- if (inherits(fit, "gls")) coef(fit) else fixef(fit)
  r <- y - as.vector(X %*% beta[colnames(X)])
  logdet <- 0
  quad <- 0
  XtVX <- matrix(0, ncol(X), ncol(X))
  groups <- as.character(frame[[spec$subject]])
  for (s in unique(groups)) {
    rows <- which(groups == s)
    V <- if (inherits(fit, "gls")) {
      if (length(rows) == 1) matrix(fit$sigma^2 * (if (is.null(fit$modelStruct$varStruct)) 1 else
        1 / varWeights(fit$modelStruct$varStruct)[rows]^2), 1, 1)
      else unclass(getVarCov(fit, individual = s))[, , drop = FALSE]
    } else {
      as.matrix(getVarCov(fit, individuals = s, type = "marginal")[[1]])
    }
    C <- tryCatch(chol(V), error = function(e) NULL)
    if (is.null(C)) return(NA_real_)
    logdet <- logdet + 2 * sum(log(diag(C)))
    w <- backsolve(C, r[rows], transpose = TRUE)
    quad <- quad + sum(w^2)
    Xw <- backsolve(C, X[rows, , drop = FALSE], transpose = TRUE)
    XtVX <- XtVX + crossprod(Xw)
  }
  n <- nrow(X)
  p <- ncol(X)
  if (method == "ML") -0.5 * (n * log(2 * pi) + logdet + quad)
  else -0.5 * ((n - p) * log(2 * pi) + logdet + as.numeric(determinant(XtVX)$modulus) + quad)
}

fit_best <- function(frame, spec, model, method) {
  runs <- list()
  for (control in c("default", "tight", "optim")) runs[[control]] <- fit_once(frame, spec, model, method, control)
  ok <- function() Filter(function(r) is_fit(r$value), runs)
  for (r in 1:3) {
    good <- ok()
    if (!length(good)) break
    best <- good[[which.max(vapply(good, function(x) as.numeric(logLik(x$value)), 0))]]$value
    cs <- unname(coef(best$modelStruct$corStruct, unconstrained = FALSE))
    vs <- best$modelStruct$varStruct
    name <- paste0("restart_", r)
    runs[[name]] <- fit_once(frame, spec, model, method, "tight", cor_value = cs,
                             var_value = if (is.null(vs)) NULL else coef(vs, unconstrained = FALSE))
    if (!is_fit(runs[[name]]$value) || as.numeric(logLik(runs[[name]]$value)) < as.numeric(logLik(best)) + 1e-9) break
  }
  good <- ok()
  checks <- lapply(good, function(r) {
    at <- definition_loglik(r$value, frame, spec, method)
    list(definition = at, nlme = as.numeric(logLik(r$value)),
         ok = !is.na(at) && abs(at - as.numeric(logLik(r$value))) < 1e-4)
  })
  rejected <- lapply(checks[!vapply(checks, function(x) x$ok, TRUE)], function(x)
    list(nlme_logLik = x$nlme, definition_logLik = x$definition,
         reason = "nlme's logLik is not the likelihood at its estimates (a numerically singular covariance)"))
  good <- good[vapply(checks, function(x) x$ok, TRUE)]
  if (!length(good)) return(list(status = "error", errors = lapply(runs, function(r) r$value$error)))
  logliks <- vapply(good, function(x) as.numeric(logLik(x$value)), 0)
  chosen <- names(good)[which.max(logliks)]
  fit <- good[[chosen]]$value
  ll <- logLik(fit)
  n <- nrow(frame)
  df <- as.integer(attr(ll, "df"))
  list(status = if (length(good[[chosen]]$messages)) "warning" else "ok", messages = as.list(good[[chosen]]$messages),
       engine = if (inherits(fit, "gls")) "nlme::gls" else "nlme::lme", attempt = chosen,
       attempts = lapply(runs, function(r) if (is_fit(r$value)) as.numeric(logLik(r$value)) else r$value$error),
       rejected_attempts = rejected, logLik = as.numeric(ll), df = df, AIC = -2 * as.numeric(ll) + 2 * df, BIC = -2 * as.numeric(ll) + log(n) * df,
       nobs = n, fixed_effects = as.list(if (inherits(fit, "gls")) coef(fit) else fixef(fit)))
}

fit_lmer <- function(frame, spec, bar, method) {
  formula <- sprintf("%s + %s", spec$mean, bar)
  run <- capture(lmer(as.formula(formula), data = frame, REML = method == "REML"))
  fit <- run$value
  ll <- logLik(fit)
  df <- as.integer(attr(ll, "df"))
  n <- nrow(frame)
  list(status = if (length(run$messages)) "warning" else "ok", messages = as.list(run$messages), engine = "lme4::lmer",
       formula = formula, logLik = as.numeric(ll), df = df, AIC = -2 * as.numeric(ll) + 2 * df,
       BIC = -2 * as.numeric(ll) + log(n) * df, nobs = n, fixed_effects = as.list(fixef(fit)))
}

# The candidate formulas as the pipeline writes them (the visit column read as discrete visits).
models_of <- function(spec) {
  id <- spec$subject
  fixed <- spec$mean
  out <- list()
  for (s in spec$structures) {
    out[[s]] <- list(structure = s, random = NULL, formula = sprintf("%s + %s(%s | %s)", fixed, s, spec$visit, id))
  }
  out$sp_exp <- list(structure = "sp_exp", random = NULL, formula = sprintf("%s + sp_exp(%s | %s)", fixed, spec$time, id))
  out$ri_ar1 <- list(structure = "ar1", random = "~ 1",
                     formula = sprintf("%s + (1 | %s) + ar1(%s | %s)", fixed, id, spec$visit, id))
  out$ri_sp_exp <- list(structure = "sp_exp", random = "~ 1",
                        formula = sprintf("%s + (1 | %s) + sp_exp(%s | %s)", fixed, id, spec$time, id))
  out$ris_sp_exp <- list(structure = "sp_exp", random = paste("~", spec$slope),
                         formula = sprintf("%s + (%s | %s) + sp_exp(%s | %s)", fixed, spec$slope, id, spec$time, id))
  out
}

fits <- list()
choices <- list()
records <- list()
for (name in names(datasets)) {
  spec <- datasets[[name]]
  frame <- read_back(name)
  fits[[name]] <- list()
  for (method in c("ML", "REML")) {
    for (model_name in names(models_of(spec))) {
      model <- models_of(spec)[[model_name]]
      rec <- fit_best(frame, spec, model, method)
      rec$formula <- model$formula
      fits[[name]][[model_name]][[method]] <- rec
      cat(sprintf("%-20s %-11s %-4s %-7s logLik %.6f df %s\n", name, model_name, method, rec$status,
                  if (is.null(rec$logLik)) NA else rec$logLik, if (is.null(rec$df)) NA else rec$df))
    }
    for (bar in c("ri", "ris")) {
      term <- if (bar == "ri") sprintf("(1 | %s)", spec$subject) else sprintf("(%s | %s)", spec$slope, spec$subject)
      rec <- fit_lmer(frame, spec, term, method)
      fits[[name]][[bar]][[method]] <- rec
      cat(sprintf("%-20s %-11s %-4s %-7s logLik %.6f df %d\n", name, bar, method, rec$status, rec$logLik, rec$df))
    }
  }
  ml <- Filter(function(r) !is.null(r$ML$logLik), fits[[name]])
  aic <- vapply(ml, function(r) r$ML$AIC, 0)
  bic <- vapply(ml, function(r) r$ML$BIC, 0)
  choices[[name]] <- list(by_aic = names(aic)[which.min(aic)], by_bic = names(bic)[which.min(bic)],
                          aic = as.list(sort(aic)), bic = as.list(sort(bic)))
  cat(sprintf("%-20s chosen by AIC: %s, by BIC: %s\n", name, choices[[name]]$by_aic, choices[[name]]$by_bic))
  records[[name]] <- list(file = file.path("data", paste0(name, ".csv")), source = spec$source, subject = spec$subject,
                          visit = spec$visit, time = spec$time, outcome = spec$outcome, mean = spec$mean,
                          nrow = nrow(frame), n_subjects = nlevels(frame[[spec$subject]]),
                          visits = sort(unique(frame[[spec$visit]])))
}

reference <- list(
  generated_by = "Rscript tests/reference/make_reference_heldout.R",
  R_version = R.version.string, nlme_version = as.character(packageVersion("nlme")),
  lme4_version = as.character(packageVersion("lme4")),
  seconds = as.numeric(difftime(Sys.time(), started, units = "secs")),
  datasets = records, fits = fits, choices = choices
)
out <- file.path(ref_dir, "nlme_reference_heldout.json")
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"), out)
cat("wrote", out, sprintf("(%.0f s)\n", reference$seconds))
