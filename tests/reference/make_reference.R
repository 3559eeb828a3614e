# Reference numbers from lme4 for tests/test_reference.py.
#
# Run from the repository root:   Rscript tests/reference/make_reference.R
# Needs R with lme4, nlme and jsonlite (Debian: apt-get install r-base-core r-cran-lme4 r-cran-jsonlite).
#
# What it does:
#   1. exports the public data sets (lme4::sleepstudy, nlme::Orthodont, datasets::ChickWeight) to
#      tests/reference/data/*.csv, factors turned into plain text columns;
#   2. reads every data set back from its CSV (the simulated ones were written by
#      longitudinal/simulate.py, see tests/reference/README.md), so R fits exactly the numbers that
#      Python reads;
#   3. fits every candidate with lmer(..., REML = FALSE) and lmer(..., REML = TRUE), default
#      lmerControl(), and writes tests/reference/lme4_reference.json. Nothing is rounded.
#
# Conventions the Python side relies on:
#   - the columns listed in `factors` are converted with factor(as.character(x)) under the C collation,
#     so factor levels (and therefore the reference level and the names "SexMale", "Diet2", "site3")
#     follow Python's sorted(str) order; every other column stays numeric;
#   - df is attr(logLik(fit), "df") = fixed effects + covariance parameters (theta) + 1;
#     BIC uses n = number of rows; for REML fits logLik/AIC/BIC are those of the REML criterion,
#     as lme4 reports them (not comparable across different fixed effects).

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

set.seed(20240601)  # nothing below is random (data come from files); fixed in case that changes
invisible(Sys.setlocale("LC_COLLATE", "C"))

ref_dir <- file.path("tests", "reference")
data_dir <- file.path(ref_dir, "data")
if (!dir.exists(data_dir)) {
  stop("run from the repository root: ", data_dir, " not found")
}

# ------------------------------------------------------------------------------ data sets and candidates

datasets <- list(
  sleepstudy = list(
    source = "lme4::sleepstudy",
    subject = "Subject", time = "Days", outcome = "Reaction",
    factors = c("Subject"),
    candidates = c(
      ri = "Reaction ~ Days + (1 | Subject)",
      ris = "Reaction ~ Days + (Days | Subject)",
      ris_uncorrelated = "Reaction ~ Days + (Days || Subject)",
      slope_only = "Reaction ~ Days + (0 + Days | Subject)",
      quadratic = "Reaction ~ Days + I(Days^2) + (Days | Subject)"
    )
  ),
  orthodont = list(
    source = "nlme::Orthodont",
    subject = "Subject", time = "age", outcome = "distance",
    factors = c("Subject", "Sex"),
    candidates = c(
      ri = "distance ~ age * Sex + (1 | Subject)",
      ris = "distance ~ age * Sex + (1 + age | Subject)",
      ris_split = "distance ~ age * Sex + (1 | Subject) + (0 + age | Subject)",
      additive = "distance ~ age + Sex + (1 | Subject)",
      slope_by_sex = "distance ~ age + age:Sex + (1 | Subject)"
    )
  ),
  chickweight = list(
    source = "datasets::ChickWeight",
    subject = "Chick", time = "Time", outcome = "weight",
    factors = c("Chick", "Diet"),
    candidates = c(
      ri = "weight ~ Time * Diet + (1 | Chick)",
      ris = "weight ~ Time * Diet + (Time | Chick)",
      ris_uncorrelated = "weight ~ Time * Diet + (Time || Chick)",
      quadratic = "weight ~ Time * Diet + I(Time^2) + (Time | Chick)"
    )
  ),
  sim_balanced = list(
    source = paste(
      "longitudinal.simulate: SimulationSpec(n_subjects=40, min_visits=6, max_visits=6,",
      "dropout_probability=0.0, seed=101)"
    ),
    subject = "patient_id", time = "week", outcome = "score",
    factors = c("patient_id", "arm"),
    candidates = c(
      ri = "score ~ week * arm + age + (1 | patient_id)",
      ris = "score ~ week * arm + age + (week | patient_id)",
      ris_uncorrelated = "score ~ week * arm + age + (week || patient_id)",
      slope_by_arm = "score ~ week + week:arm + age + (week | patient_id)",
      quadratic = "score ~ week * arm + I(week^2) + age + (week | patient_id)"
    )
  ),
  sim_dropout = list(
    source = paste(
      "longitudinal.simulate: SimulationSpec(n_subjects=120, min_visits=2, max_visits=8,",
      "dropout_probability=0.2, seed=102)"
    ),
    subject = "patient_id", time = "week", outcome = "score",
    factors = c("patient_id", "arm"),
    candidates = c(
      ri = "score ~ week * arm + age + (1 | patient_id)",
      ris = "score ~ week * arm + age + (week | patient_id)",
      ris_split = "score ~ week * arm + age + (1 | patient_id) + (0 + week | patient_id)",
      slope_only = "score ~ week * arm + age + (0 + week | patient_id)"
    )
  ),
  sim_site = list(
    source = paste(
      "longitudinal.simulate: SimulationSpec(n_subjects=100, min_visits=3, max_visits=6,",
      "dropout_probability=0.15, site_effects=(0.0, 3.0, -2.0, 1.5), seed=103)"
    ),
    subject = "patient_id", time = "week", outcome = "score",
    factors = c("patient_id", "arm", "site"),
    candidates = c(
      ri = "score ~ week * arm + age + site + (1 | patient_id)",
      ris = "score ~ week * arm + age + site + (1 + week | patient_id)",
      ris_no_site = "score ~ week * arm + age + (1 + week | patient_id)"
    )
  ),
  sim_singular = list(
    source = paste(
      "longitudinal.simulate: SimulationSpec(n_subjects=15, min_visits=4, max_visits=4,",
      "dropout_probability=0.0, random_slope_sd=0.0, random_correlation=0.0, seed=108)"
    ),
    subject = "patient_id", time = "week", outcome = "score",
    factors = c("patient_id", "arm"),
    candidates = c(
      ri = "score ~ week * arm + age + (1 | patient_id)",
      ris = "score ~ week * arm + age + (week | patient_id)",
      ris_uncorrelated = "score ~ week * arm + age + (week || patient_id)"
    )
  )
)

# ------------------------------------------------------------------------------ export public data sets

as_plain <- function(frame, columns) {
  frame <- as.data.frame(frame)[, columns]
  for (column in columns) {
    if (is.factor(frame[[column]])) frame[[column]] <- as.character(frame[[column]])
  }
  rownames(frame) <- NULL
  frame
}

public <- list(
  sleepstudy = as_plain(lme4::sleepstudy, c("Subject", "Days", "Reaction")),
  orthodont = as_plain(nlme::Orthodont, c("Subject", "age", "distance", "Sex")),
  chickweight = as_plain(datasets::ChickWeight, c("Chick", "Time", "weight", "Diet"))
)
for (name in names(public)) {
  write.csv(public[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

# ------------------------------------------------------------------------------ fitting

read_dataset <- function(name, spec) {
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (column in spec$factors) {
    frame[[column]] <- factor(as.character(frame[[column]]))
  }
  frame
}

fit_record <- function(formula, frame, spec, reml) {
  captured <- character()
  fit <- withCallingHandlers(
    lmer(as.formula(formula), data = frame, REML = reml),
    warning = function(w) {
      captured <<- c(captured, conditionMessage(w))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      captured <<- c(captured, trimws(conditionMessage(m)))
      invokeRestart("muffleMessage")
    }
  )
  ll <- logLik(fit)
  beta <- fixef(fit)
  se <- sqrt(diag(as.matrix(vcov(fit))))
  vc <- as.data.frame(VarCorr(fit))
  is_sd <- vc$grp != "Residual" & is.na(vc$var2)
  is_corr <- vc$grp != "Residual" & !is.na(vc$var2)
  devcomp <- getME(fit, "devcomp")$cmp
  list(
    formula = formula,
    method = if (reml) "REML" else "ML",
    logLik = as.numeric(ll),
    df = as.integer(attr(ll, "df")),
    AIC = AIC(fit),
    BIC = BIC(fit),
    deviance = if (reml) NULL else unname(devcomp[["dev"]]),
    REML_criterion = if (reml) unname(devcomp[["REML"]]) else NULL,
    fixed_effects = lapply(
      setNames(seq_along(beta), names(beta)),
      function(i) list(estimate = unname(beta[[i]]), std_error = unname(se[[i]]))
    ),
    random_effects = lapply(which(is_sd), function(i) list(
      grp = vc$grp[[i]], group = spec$subject, term = vc$var1[[i]],
      variance = vc$vcov[[i]], sd = vc$sdcor[[i]]
    )),
    correlations = lapply(which(is_corr), function(i) list(
      grp = vc$grp[[i]], group = spec$subject, term1 = vc$var1[[i]], term2 = vc$var2[[i]],
      corr = vc$sdcor[[i]]
    )),
    var_corr = vc,
    residual_sd = sigma(fit),
    theta = I(unname(getME(fit, "theta"))),
    isSingular = isSingular(fit),
    nobs = nobs(fit),
    ngrps = as.list(ngrps(fit)),
    optimizer = fit@optinfo$optimizer,
    convergence_messages = as.list(fit@optinfo$conv$lme4$messages),
    warnings = as.list(captured)
  )
}

records <- list()
for (name in names(datasets)) {
  spec <- datasets[[name]]
  frame <- read_dataset(name, spec)
  fits <- list()
  for (candidate in names(spec$candidates)) {
    formula <- spec$candidates[[candidate]]
    fits[[candidate]] <- list(
      ML = fit_record(formula, frame, spec, reml = FALSE),
      REML = fit_record(formula, frame, spec, reml = TRUE)
    )
    cat(sprintf("%-13s %-17s ML logLik %.4f  REML crit %.4f\n", name, candidate,
                fits[[candidate]]$ML$logLik, fits[[candidate]]$REML$REML_criterion))
  }
  records[[name]] <- list(
    file = file.path("data", paste0(name, ".csv")),
    source = spec$source,
    subject = spec$subject, time = spec$time, outcome = spec$outcome,
    factors = as.list(spec$factors),
    nrow = nrow(frame),
    candidates = as.list(spec$candidates),
    fits = fits
  )
}

reference <- list(
  generated_by = "Rscript tests/reference/make_reference.R",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  Matrix_version = as.character(packageVersion("Matrix")),
  nlme_version = as.character(packageVersion("nlme")),
  datasets = records
)
out <- file.path(ref_dir, "lme4_reference.json")
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null",
                  dataframe = "rows"),
           out)
cat("wrote", out, "\n")
