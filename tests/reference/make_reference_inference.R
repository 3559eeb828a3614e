# Reference numbers for issue 15 (small-sample inference): Satterthwaite and Kenward-Roger df for the fixed
# effects, profile intervals of the variance parameters, and emmeans marginal means with treatment-vs-control
# contrasts, for lmer REML fits (lmerTest) and two glmer fits (binomial, Poisson; z tests, response scale).
#
# Run from the repository root:   Rscript tests/reference/make_reference_inference.R
# Needs R with lme4, lmerTest, pbkrtest, emmeans, nlme, MASS, geepack, glmmTMB, HSAUR3 and lava (data only) and jsonlite.
# About a minute. Writes tests/reference/data/inf_*.csv (public data sets exported, one simulated trial with
# set.seed(1501)) and tests/reference/inference_reference.json; every fit reads its data back from the CSV, so
# R fits exactly the numbers Python reads. sleepstudy.csv and bodyweight.csv are reused from data/ as they are.
#
# Conventions (as make_reference.R): the `factors` columns become factor(as.character(x)) under the C
# collation, every other column stays numeric; a `factor(x)` inside a formula is R's (levels of the numeric x
# in numeric order). Every LMM is fitted by REML with bobyqa at rhoend = 1e-12 (lme4's default stops short
# enough to move SEs by 0.2%), every GLMM by Laplace (nAGQ = 1) with the same optimizer settings.
#
# What lme4's profile is of: confint(fit, method = "profile") on a REML fit profiles the *ML* deviance.
# profile.merMod() builds its objective with lme4:::devfun2(), whose first line is `fm <- refitML(fm)`: the
# model is refitted by ML and the deviance profiled is -2 logLik_ML (lme4 1.1.31; the help page does not say
# so). The intervals are therefore ML profile intervals; `profile_criterion_check` in the JSON confirms it by
# profiling refitML(fit) directly and comparing. The REML estimates need not lie in them (they usually do,
# the ML SDs being a little smaller).
#
# `profile_reml` holds REML profile intervals of the variance parameters (SDs, correlations, sigma), made
# with lme4's own profiling code and reml_devfun2() below in place of devfun2(): the same function of
# (sd, cor, sigma) but the REML criterion, ldL2 + ldRX2 + pwrss / sigma^2 + (n - p) log(2 pi sigma^2), at the
# REML fit. For random-intercept models `profile_reml_check` recomputes those intervals with the REML
# criterion written out with dense matrices (reml_written_out()) and root finding.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(emmeans)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()
emm_options(lmerTest.limit = 1e5, pbkrtest.limit = 1e5)

lmm_control <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
glmm_control <- glmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))

# --- data ------------------------------------------------------------------------------------------------

# A two-arm trial: 40 subjects (20 per arm), visits at weeks 0, 2, 4, 8, monotone dropout (probability 0.15
# at each visit after baseline), age a baseline covariate, random intercept (SD 3) and slope (SD 0.5 per week), residual SD 1.5.
simulate_trial <- function() {
  set.seed(1501)
  n <- 40
  weeks <- c(0, 2, 4, 8)
  arm <- rep(c("control", "treatment"), each = n / 2)
  age <- round(runif(n, 30, 70), 1)
  b0 <- rnorm(n, 0, 3)
  b1 <- rnorm(n, 0, 0.5)
  rows <- list()
  for (i in seq_len(n)) {
    last <- 1
    while (last < length(weeks) && runif(1) > 0.15) last <- last + 1
    week <- weeks[seq_len(last)]
    mean <- 20 + 0.1 * (age[i] - 50) + (0.2 - 0.4 * (arm[i] == "treatment")) * week + b0[i] + b1[i] * week
    rows[[i]] <- data.frame(id = sprintf("s%02d", i), arm = arm[i], age = age[i], week = week,
                            y = round(mean + rnorm(length(week), 0, 1.5), 3))
  }
  do.call(rbind, rows)
}

data(dietox, package = "geepack")
data(toenail, package = "HSAUR3")
data(Owls, package = "glmmTMB")
toenail$outcome <- as.integer(toenail$outcome == "moderate or severe")
sitka <- MASS::Sitka
sitka$weeks <- (sitka$Time - 152) / 7  # weeks since the first measurement: Time in days makes lme4 warn
data(calcium, package = "lava")

# The same trial in four centres, two per arm (centre nested in arm: lme4 drops the arm-aliased centre column),
# age2 = 2 age + 1, a covariate collinear with age (lme4 drops age2), and a site numbered within arm: emmeans
# averages a nested factor only over the levels present within each level of its nesting factor, and reports
# a mean that is not estimable from the full design (age2 held at its mean while age moves) as nonEst.
simulate_centres <- function(trial) {
  number <- as.integer(substr(trial$id, 2, 3))
  trial$centre <- ifelse(trial$arm == "control", ifelse(number %% 2 == 1, "A", "B"), ifelse(number %% 2 == 1, "C", "D"))
  trial$age2 <- 2 * trial$age + 1
  # site 1, 2 in both arms, site 3 in treatment only: site %in% arm from the terms (arm:site, no site main
  # effect), not from the data
  trial$site <- ifelse(number %in% c(21, 23), 3, 1 + number %% 2)
  trial
}

exported <- list(
  inf_sim_trial = simulate_trial(),
  inf_sim_centres = simulate_centres(simulate_trial()),
  inf_sitka = as_plain(sitka, c("tree", "treat", "Time", "weeks", "size")),
  inf_dietox = as_plain(dietox, c("Pig", "Evit", "Cu", "Time", "Weight")),
  inf_calcium = as_plain(calcium, c("person", "group", "visit", "age", "bmd")),
  inf_toenail = as_plain(toenail, c("patientID", "treatment", "visit", "time", "outcome")),
  inf_owls = as_plain(Owls, c("Nest", "FoodTreatment", "SexParent", "ArrivalTime", "SiblingNegotiation"))
)
for (name in names(exported)) {
  stopifnot(!anyNA(exported[[name]]))
  write.csv(exported[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

sources <- list(
  sleepstudy = "lme4::sleepstudy (shared with make_reference.R)",
  bodyweight = "nlme::BodyWeight (shared with make_reference_units.R)",
  inf_sim_trial = "make_reference_inference.R: simulate_trial() (set.seed(1501))",
  inf_sim_centres = "make_reference_inference.R: simulate_centres(simulate_trial()) (set.seed(1501))",
  inf_sitka = "MASS::Sitka, weeks = (Time - 152) / 7",
  inf_dietox = "geepack::dietox",
  inf_calcium = "lava::calcium (bone mineral density, calcium supplement C vs placebo P, 5 visits)",
  inf_toenail = "HSAUR3::toenail, outcome moderate or severe = 1",
  inf_owls = "glmmTMB::Owls"
)

# --- cases -----------------------------------------------------------------------------------------------

# emmeans: by = the group factor (G), time = the time variable (T), at = the T values; `averaged` names the
# factors emmeans averages over with equal weights, `covariate` the numeric ones it holds at their mean.
cases <- list(
  list(name = "sleepstudy_slopes", data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)",
       factors = "Subject", heldout = FALSE),
  list(name = "sleepstudy_intercept", data = "sleepstudy", formula = "Reaction ~ Days + (1 | Subject)",
       factors = "Subject", heldout = FALSE),
  list(name = "bodyweight_slopes", data = "bodyweight", formula = "weight ~ Time * Diet + (Time | Rat)",
       factors = c("Rat", "Diet"), heldout = FALSE,
       emmeans = list(by = "Diet", time = "Time", at = c(1, 22, 44, 64))),
  list(name = "sim_trial_factor_week", data = "inf_sim_trial", formula = "y ~ factor(week) * arm + (1 | id)",
       factors = c("id", "arm"), heldout = FALSE,
       emmeans = list(by = "arm", time = "week", at = c(0, 2, 4, 8))),
  list(name = "sim_trial_slopes_age", data = "inf_sim_trial", formula = "y ~ week * arm + age + (week | id)",
       factors = c("id", "arm"), heldout = FALSE,
       emmeans = list(by = "arm", time = "week", at = c(0, 2, 4, 8))),
  list(name = "sim_centres_nested", data = "inf_sim_centres", formula = "y ~ week * arm + centre + (1 | id)",
       factors = c("id", "arm", "centre"), heldout = FALSE,
       emmeans = list(by = "arm", time = "week", at = c(0, 2, 4, 8))),
  list(name = "sim_centres_collinear_age", data = "inf_sim_centres",
       formula = "y ~ week * arm + age + age2 + (1 | id)", factors = c("id", "arm", "centre"), heldout = FALSE,
       emmeans = list(by = "arm", time = "age", at = c(40, 60))),
  list(name = "sim_centres_site_terms", data = "inf_sim_centres", formula = "y ~ week * arm + arm:site + (1 | id)",
       factors = c("id", "arm", "centre", "site"), heldout = FALSE,
       emmeans = list(by = "arm", time = "week", at = c(0, 2, 4, 8))),
  list(name = "sitka_slopes", data = "inf_sitka", formula = "size ~ weeks * treat + (weeks | tree)",
       factors = c("tree", "treat"), heldout = TRUE,
       emmeans = list(by = "treat", time = "weeks", at = c(0, 7, 15))),
  list(name = "dietox_slopes", data = "inf_dietox", formula = "Weight ~ Time * Cu + Evit + (Time | Pig)",
       factors = c("Pig", "Evit", "Cu"), heldout = TRUE,
       emmeans = list(by = "Cu", time = "Time", at = c(1, 6, 12))),
  list(name = "calcium_slopes", data = "inf_calcium", formula = "bmd ~ visit * group + (visit | person)",
       factors = c("person", "group"), heldout = TRUE,
       emmeans = list(by = "group", time = "visit", at = c(1, 3, 5))),
  list(name = "toenail_binomial", data = "inf_toenail", formula = "outcome ~ treatment * time + (1 | patientID)",
       factors = c("patientID", "treatment"), heldout = TRUE, family = "binomial",
       emmeans = list(by = "treatment", time = "time", at = c(0, 3, 6, 12))),
  list(name = "owls_poisson", data = "inf_owls",
       formula = "SiblingNegotiation ~ FoodTreatment * ArrivalTime + SexParent + (1 | Nest)",
       factors = c("Nest", "FoodTreatment", "SexParent"), heldout = TRUE, family = "poisson",
       emmeans = list(by = "FoodTreatment", time = "ArrivalTime", at = c(22, 25, 28)))
)

read_case_data <- function(case) {
  frame <- read.csv(file.path(data_dir, paste0(case$data, ".csv")), stringsAsFactors = FALSE)
  for (column in case$factors) frame[[column]] <- factor(as.character(frame[[column]]))
  frame
}

# --- REML profiles ---------------------------------------------------------------------------------------

# lme4:::devfun2() (lme4 1.1.31) without its refitML(): the REML criterion as a function of the SDs,
# correlations and sigma, the fixed effects at their GLS values for those parameters.
reml_devfun2 <- function(fm, useSc = TRUE,
                         transfuns = list(from.chol = Cv_to_Sv, to.chol = Sv_to_Cv, to.sd = identity), ...) {
  stopifnot(is(fm, "merMod"), isLMM(fm), isREML(fm))
  vlist <- lengths(fm@cnms)
  pp <- fm@pp$copy()
  resp <- fm@resp$copy()
  opt <- transfuns$from.chol(pp$theta, n = vlist, s = sigma(fm))
  names(opt) <- profnames(fm, useSc = useSc, ...)
  opt <- c(opt, fixef(fm))
  np <- length(pp$theta) + 1L
  n <- nrow(pp$V)
  p <- ncol(pp$X)
  ldW <- sum(log(resp$weights))
  ans <- function(pars) {
    stopifnot(is.numeric(pars), length(pars) == np)
    sigma <- transfuns$to.sd(pars[np])
    .Call(lmer_Deviance, pp$ptr(), resp$ptr(), transfuns$to.chol(pars, n = vlist, s = sigma))
    pp$ldL2() + pp$ldRX2() - ldW + (resp$wrss() + pp$sqrL(1)) / sigma^2 + (n - p) * log(2 * pi * sigma^2)
  }
  attr(ans, "optimum") <- opt
  attr(ans, "basedev") <- REMLcrit(fm)
  attr(ans, "thopt") <- pp$theta
  attr(ans, "stderr") <- unname(coef(summary(fm))[, 2])
  class(ans) <- "devfun"
  ans
}
environment(reml_devfun2) <- asNamespace("lme4")

reml_confint <- function(fit, level) {
  original <- get("devfun2", envir = asNamespace("lme4"))
  assignInNamespace("devfun2", reml_devfun2, "lme4")
  on.exit(assignInNamespace("devfun2", original, "lme4"))
  confint(fit, parm = "theta_", method = "profile", oldNames = FALSE, level = level)
}

# The REML criterion of a model with one random intercept, written out: sum log|V_i| + log|X'V^-1 X| +
# r'V^-1 r + (n - p) log(2 pi), V_i = sigma^2 I + sd^2 11'. Profiled over the other parameter by optimize(),
# the interval ends found by uniroot(): an independent check of reml_devfun2() and lme4's profile splines.
reml_written_out <- function(fit, level = 0.95) {
  X <- getME(fit, "X")
  y <- getME(fit, "y")
  group <- getME(fit, "flist")[[1]]
  rows <- split(seq_along(y), group)
  criterion <- function(sd, sigma) {
    XtVX <- 0
    XtVy <- 0
    logdet <- 0
    inverses <- list()
    for (i in seq_along(rows)) {
      k <- rows[[i]]
      V <- diag(sigma^2, length(k)) + sd^2
      inverses[[i]] <- solve(V)
      logdet <- logdet + as.numeric(determinant(V)$modulus)
      XtVX <- XtVX + crossprod(X[k, , drop = FALSE], inverses[[i]] %*% X[k, , drop = FALSE])
      XtVy <- XtVy + crossprod(X[k, , drop = FALSE], inverses[[i]] %*% y[k])
    }
    beta <- solve(XtVX, XtVy)
    quadratic <- 0
    for (i in seq_along(rows)) {
      r <- y[rows[[i]]] - X[rows[[i]], , drop = FALSE] %*% beta
      quadratic <- quadratic + as.numeric(crossprod(r, inverses[[i]] %*% r))
    }
    logdet + as.numeric(determinant(XtVX)$modulus) + quadratic + (length(y) - ncol(X)) * log(2 * pi)
  }
  sd_hat <- as.data.frame(VarCorr(fit))$sdcor[1]
  sigma_hat <- sigma(fit)
  base <- criterion(sd_hat, sigma_hat)
  cut <- qnorm(1 - (1 - level) / 2)^2
  over_sigma <- function(sd) optimize(function(s) criterion(sd, s), sigma_hat * c(0.3, 3), tol = 1e-10)$objective
  over_sd <- function(sigma) optimize(function(s) criterion(s, sigma), sd_hat * c(0.01, 5), tol = 1e-10)$objective
  ends <- function(profiled, hat, low, high) {
    c(uniroot(function(v) profiled(v) - base - cut, c(low, hat), tol = 1e-12)$root,
      uniroot(function(v) profiled(v) - base - cut, c(hat, high), tol = 1e-12)$root)
  }
  list(criterion_at_fit = base, reml_criterion = REMLcrit(fit),
       sd = ends(over_sigma, sd_hat, sd_hat * 0.05, sd_hat * 4),
       sigma = ends(over_sd, sigma_hat, sigma_hat * 0.4, sigma_hat * 2.5))
}

# --- extraction ------------------------------------------------------------------------------------------

named_matrix <- function(x) list(names = rownames(x), matrix = unname(as.matrix(x)))

coefficient_block <- function(coefficients) {
  list(se = unname(coefficients[, "Std. Error"]), df = unname(coefficients[, "df"]),
       t = unname(coefficients[, "t value"]), p = unname(coefficients[, "Pr(>|t|)"]))
}

# The variance-parameter rows of confint(..., oldNames = FALSE) come in theta's order (per bar, the lower
# triangle column by column: sd of term j, then the correlations of term j with the later terms), then sigma.
profile_block <- function(fit, criterion = "ML", level = 0.95) {
  run <- if (criterion == "ML") {
    capture(confint(fit, method = "profile", oldNames = FALSE, level = level))
  } else {
    capture(reml_confint(fit, level))
  }
  description <- if (criterion == "ML") {
    "ML deviance (lme4 profiles refitML(fit); see the script's header)"
  } else {
    "REML criterion (lme4's profile() with reml_devfun2(); see the script's header)"
  }
  out <- list(criterion = description, level = level, messages = I(unique(run$messages)))
  if (is.list(run$value)) return(c(out, list(error = run$value$error)))
  ci <- run$value
  sds <- list()
  cors <- list()
  row <- 0
  cnms <- getME(fit, "cnms")
  for (group in names(cnms)) {
    terms <- cnms[[group]]
    for (j in seq_along(terms)) {
      for (i in j:length(terms)) {
        row <- row + 1
        if (i == j) {
          sds[[length(sds) + 1]] <- list(group = group, term = terms[j], low = ci[row, 1], high = ci[row, 2],
                                         lme4_name = rownames(ci)[row])
        } else {
          cors[[length(cors) + 1]] <- list(group = group, term1 = terms[j], term2 = terms[i], low = ci[row, 1],
                                           high = ci[row, 2], lme4_name = rownames(ci)[row])
        }
      }
    }
  }
  stopifnot(rownames(ci)[row + 1] == "sigma")
  out <- c(out, list(sd = sds, cor = cors, sigma = unname(ci[row + 1, ])))
  if (nrow(ci) > row + 1) {
    fixed_rows <- (row + 2):nrow(ci)
    out$fixed <- list(term = rownames(ci)[fixed_rows], low = unname(ci[fixed_rows, 1]),
                      high = unname(ci[fixed_rows, 2]))
  }
  out
}

# One summary row per list entry: the group level as `level`, the time value as `time`, every other column
# under emmeans' own name; an infinite df (asymptotic, GLMMs) is left out.
summary_rows <- function(s, by, time) {
  s <- as.data.frame(s)
  lapply(seq_len(nrow(s)), function(i) {
    row <- list()
    for (column in names(s)) {
      value <- s[[column]][i]
      key <- if (column == by) "level" else if (column == time) "time" else column
      if (key == "time") value <- as.numeric(as.character(value))
      if (is.factor(value) || is.character(value)) value <- as.character(value)
      if (is.numeric(value) && is.infinite(value)) next
      row[[key]] <- value
    }
    row
  })
}

adjustment <- function(messages) {
  hit <- regmatches(messages, regexpr("P value adjustment: [^ ]+", messages))
  if (length(hit) == 0) "none" else sub("P value adjustment: ", "", hit)
}

emmeans_block <- function(fit, spec, lmer_df = NULL, type = NULL) {
  at <- setNames(list(spec$at), spec$time)
  specs <- as.formula(sprintf("~ %s | %s", spec$by, spec$time))
  args <- list(fit, specs, at = at)
  if (!is.null(lmer_df)) args$lmer.df <- lmer_df
  if (!is.null(type)) args$type <- type
  run <- capture(do.call(emmeans, args))
  emm <- run$value
  means <- summary(emm)
  con <- if (is.null(type)) contrast(emm, "trt.vs.ctrl") else contrast(emm, "trt.vs.ctrl", type = type)
  con_summary <- summary(con, infer = TRUE)
  messages <- attr(con_summary, "mesg")
  list(messages = I(run$messages),
       means = summary_rows(means, spec$by, spec$time), means_annotations = I(attr(means, "mesg")),
       contrasts = summary_rows(con_summary, spec$by, spec$time), contrasts_annotations = I(messages),
       adjust = adjustment(messages))
}

reference_grid <- function(fit, spec) {
  grid <- ref_grid(fit, at = setNames(list(spec$at), spec$time))
  lapply(grid@levels, function(values) I(if (is.factor(values)) as.character(values) else values))
}

emmeans_section <- function(fit, spec, family) {
  grid <- reference_grid(fit, spec)
  others <- setdiff(names(grid), c(spec$by, spec$time))
  out <- list(specs = sprintf("~ %s | %s", spec$by, spec$time), by = spec$by, time = spec$time,
              at = setNames(list(I(spec$at)), spec$time), reference_grid = grid,
              averaged_over = I(others[vapply(grid[others], is.character, logical(1))]),
              held_at = structure(grid[others[!vapply(grid[others], is.character, logical(1))]],
                                  names = others[!vapply(grid[others], is.character, logical(1))]))
  out$reference_grid_default <- lapply(ref_grid(fit)@levels,
                                       function(values) I(if (is.factor(values)) as.character(values) else values))
  nesting <- ref_grid(fit)@model.info$nesting  # factor -> the factors it is nested in, as .find_nests() detects
  if (length(nesting) > 0) out$nesting <- lapply(nesting, I)
  if (grepl(sprintf("factor(%s)", spec$time), paste(deparse(formula(fit)), collapse = " "), fixed = TRUE)) {
    # emmeans keeps only the `at` values that are levels of factor(time), silently: record which survive.
    off_level <- c(spec$at[1], spec$at[1] + 1)
    kept <- summary(emmeans(fit, as.formula(sprintf("~ %s | %s", spec$by, spec$time)),
                            at = setNames(list(off_level), spec$time), lmer.df = "satterthwaite"))
    out$off_level_at_check <- list(at = I(off_level), times_returned = I(unique(as.numeric(as.character(kept[[spec$time]])))))
  }
  if (family == "gaussian") {
    out$satterthwaite <- emmeans_block(fit, spec, lmer_df = "satterthwaite")
    out$kenward_roger <- emmeans_block(fit, spec, lmer_df = "kenward-roger")
  } else {
    out$response <- emmeans_block(fit, spec, type = "response")
    out$link <- emmeans_block(fit, spec)
  }
  out
}

variance_components <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  lapply(seq_len(nrow(vc)), function(i) {
    list(grp = vc$grp[i], var1 = if (is.na(vc$var1[i])) NULL else vc$var1[i],
         var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i])
  })
}

# How well the REML optimum is pinned down: an independent fit by NLopt's BOBYQA at absolute tolerances near
# machine precision, its distance from the bobyqa fit in the criterion, theta and the Satterthwaite SEs and df.
# The criterion is flat near the optimum (BodyWeight: 1e-10 over a 1e-5 relative change in theta), so equally
# good optima give SEs a few 1e-5 apart: the tolerance a comparison with these numbers can ask for.
second_optimum <- function(fit, frame, formula, sat) {
  control <- lmerControl(optimizer = "nloptwrap",
                         optCtrl = list(xtol_abs = 1e-14, ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5))
  other <- lmer(as.formula(formula), data = frame, REML = TRUE, control = control)
  other_sat <- summary(other, ddf = "Satterthwaite")$coefficients
  relative <- function(a, b) max(abs(a / b - 1))
  list(optimizer = "nloptwrap (NLopt BOBYQA), xtol_abs = 1e-14, ftol_abs = 1e-15",
       reml_criterion = REMLcrit(other), reml_criterion_difference = REMLcrit(other) - REMLcrit(fit),
       theta_max_abs_difference = max(abs(getME(other, "theta") - getME(fit, "theta"))),
       se_max_rel_difference = relative(other_sat[, "Std. Error"], sat[, "Std. Error"]),
       df_max_rel_difference = relative(other_sat[, "df"], sat[, "df"]))
}

lmm_case <- function(case, frame) {
  run <- capture(lmer(as.formula(case$formula), data = frame, REML = TRUE, control = lmm_control))
  fit <- run$value
  stopifnot(inherits(fit, "lmerModLmerTest"))
  sat <- summary(fit, ddf = "Satterthwaite")$coefficients
  kr <- summary(fit, ddf = "Kenward-Roger")$coefficients
  stopifnot(identical(rownames(sat), rownames(kr)))
  X <- getME(fit, "X")
  optimum_check <- second_optimum(fit, frame, case$formula, sat)
  profile_reml <- profile_block(fit, criterion = "REML")
  check <- NULL
  if (length(getME(fit, "theta")) == 1 && is.null(profile_reml$error)) {
    check <- reml_written_out(fit)
    check$max_difference <- max(abs(c(check$sd - c(profile_reml$sd[[1]]$low, profile_reml$sd[[1]]$high),
                                      check$sigma - profile_reml$sigma)))
  }
  out <- list(
    fit_messages = I(run$messages),
    reml = list(reml_criterion = unname(getME(fit, "devcomp")$cmp[["REML"]]), sigma = sigma(fit),
                theta = I(unname(getME(fit, "theta"))), theta_names = I(names(getME(fit, "theta"))),
                variance_components = variance_components(fit)),
    residual_df = nrow(frame) - as.integer(Matrix::rankMatrix(X)),
    fixed = list(term = rownames(sat), estimate = unname(sat[, "Estimate"]),
                 satterthwaite = coefficient_block(sat), kenward_roger = coefficient_block(kr)),
    vcov = named_matrix(as.matrix(vcov(fit))),
    vcov_kenward_roger = named_matrix(as.matrix(pbkrtest::vcovAdj(fit))),
    optimum_check = optimum_check,
    profile = profile_block(fit),
    profile_reml = profile_reml,
    profile_reml_check = check,
    fit = fit
  )
  out[!vapply(out, is.null, logical(1))]
}

glmm_case <- function(case, frame) {
  run <- capture(glmer(as.formula(case$formula), data = frame, family = case$family, nAGQ = 1,
                       control = glmm_control))
  fit <- run$value
  coefficients <- summary(fit)$coefficients
  list(
    fit_messages = I(run$messages),
    ml = list(deviance = -2 * as.numeric(logLik(fit)), logLik = as.numeric(logLik(fit)),
              theta = I(unname(getME(fit, "theta"))), theta_names = I(names(getME(fit, "theta"))),
              variance_components = variance_components(fit)),
    fixed = list(term = rownames(coefficients), estimate = unname(coefficients[, "Estimate"]),
                 se = unname(coefficients[, "Std. Error"]), z = unname(coefficients[, "z value"]),
                 p = unname(coefficients[, "Pr(>|z|)"])),
    vcov = named_matrix(as.matrix(vcov(fit))),
    fit = fit
  )
}

results <- list()
for (case in cases) {
  t0 <- proc.time()[["elapsed"]]
  family <- if (is.null(case$family)) "gaussian" else case$family
  frame <- read_case_data(case)
  body <- if (family == "gaussian") lmm_case(case, frame) else glmm_case(case, frame)
  fit <- body$fit
  body$fit <- NULL
  record <- c(list(name = case$name, data = paste0(case$data, ".csv"), source = sources[[case$data]],
                   formula = case$formula, factors = I(case$factors), heldout = case$heldout, family = family,
                   n_obs = nobs(fit), n_groups = as.list(getME(fit, "l_i"))), body)
  if (!is.null(case$emmeans)) record$emmeans <- emmeans_section(fit, case$emmeans, family)
  if (case$name == "sleepstudy_slopes") {
    # lme4 profiles the ML deviance of a REML fit: the profile of the ML refit gives the same intervals.
    ml_profile <- profile_block(refitML(fit))
    reml_sd <- vapply(record$profile$sd, function(x) c(x$low, x$high), numeric(2))
    ml_sd <- vapply(ml_profile$sd, function(x) c(x$low, x$high), numeric(2))
    record$profile_criterion_check <- list(
      description = "max |difference| between confint(profile) of the REML fit and of refitML(fit)",
      sd = max(abs(reml_sd - ml_sd)), sigma = max(abs(record$profile$sigma - ml_profile$sigma)))
  }
  results[[length(results) + 1]] <- record
  cat(sprintf("%-24s %6.1f s\n", case$name, proc.time()[["elapsed"]] - t0))  # timings stay out of the JSON
}

versions <- list(R = R.version.string)
for (package in c("lme4", "lmerTest", "pbkrtest", "emmeans", "Matrix", "nlme", "MASS", "geepack", "glmmTMB", "HSAUR3", "lava",
                  "jsonlite")) {
  versions[[package]] <- as.character(packageVersion(package))
}
document <- list(
  meta = list(
    generated_by = "tests/reference/make_reference_inference.R",
    versions = versions,
    lmer_control = "lmerControl(optimizer = \"bobyqa\", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)), REML = TRUE",
    glmer_control = "glmerControl(optimizer = \"bobyqa\", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)), nAGQ = 1",
    profile = paste("confint(fit, method = \"profile\", oldNames = FALSE, level = 0.95); for a REML fit lme4",
                    "profiles the ML deviance (devfun2() starts with refitML(fit))"),
    emmeans = paste("emmeans(fit, ~ G | T, at = list(T = ...), lmer.df = \"satterthwaite\" / \"kenward-roger\")",
                    "(GLMMs: type = \"response\" and the link scale); contrast(emm, \"trt.vs.ctrl\") summarised with",
                    "infer = TRUE; `adjust` parsed from the annotations (\"none\" when emmeans prints no P value",
                    "adjustment, i.e. one contrast per T)")
  ),
  cases = results
)
write_json(document, file.path(ref_dir, "inference_reference.json"), auto_unbox = TRUE, digits = NA,
           pretty = TRUE, null = "null", na = "null")
