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

source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

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
  ),
  # Nested and crossed random effects. `subject` is the unit measured over time (several columns when
  # it sits below a named level); lme4 writes the nested factor `school/pupil` as `pupil:school`, the
  # Python side as `school:pupil` (see `factors` in each random effect of the JSON).
  sim_school = list(
    multilevel = TRUE,
    source = "make_reference.R: simulate_schools() (set.seed(301))",
    subject = c("school", "pupil"), time = "year", outcome = "score",
    factors = c("school", "pupil"),
    candidates = c(
      nested = "score ~ year + (1 | school/pupil)",
      school_slope = "score ~ year + (year | school) + (1 | school:pupil)",
      pupil_only = "score ~ year + (1 | school:pupil)",
      school_only = "score ~ year + (1 | school)"
    )
  ),
  sim_dogs = list(
    multilevel = TRUE,
    source = "make_reference.R: simulate_dogs() (set.seed(302))",
    subject = c("dog", "side"), time = "t", outcome = "y",
    factors = c("dog", "side", "breed"),
    candidates = c(
      dog_slope_side = "y ~ t + breed + (t | dog) + (1 | dog:side)",
      dog_slope_side_uncorrelated = "y ~ t + breed + (t || dog) + (1 | dog:side)",
      nested_intercepts = "y ~ t + breed + (1 | dog/side)",
      dog_slope = "y ~ t + breed + (t | dog)"
    )
  ),
  sim_raters = list(
    multilevel = TRUE,
    source = "make_reference.R: simulate_raters() (set.seed(303))",
    subject = "patient", time = "t", outcome = "y",
    factors = c("patient", "rater", "arm"),
    candidates = c(
      crossed = "y ~ t * arm + (t | patient) + (1 | rater)",
      crossed_intercepts = "y ~ t * arm + (1 | patient) + (1 | rater)",
      crossed_uncorrelated = "y ~ t * arm + (t || patient) + (1 | rater)",
      patient_only = "y ~ t * arm + (t | patient)"
    )
  ),
  penicillin = list(
    multilevel = TRUE,
    source = "lme4::Penicillin",
    subject = "plate", time = NULL, outcome = "diameter",
    factors = c("plate", "sample"),
    candidates = c(
      crossed = "diameter ~ 1 + (1 | plate) + (1 | sample)",
      plate_only = "diameter ~ 1 + (1 | plate)",
      sample_only = "diameter ~ 1 + (1 | sample)"
    )
  ),
  pastes = list(
    multilevel = TRUE,
    source = "lme4::Pastes",
    subject = c("batch", "cask"), time = NULL, outcome = "strength",
    factors = c("batch", "cask"),
    candidates = c(
      nested = "strength ~ 1 + (1 | batch/cask)",
      sample_only = "strength ~ 1 + (1 | batch:cask)",
      batch_only = "strength ~ 1 + (1 | batch)"
    )
  )
)

# ------------------------------------------------------------------------------ export public data sets

public <- list(
  sleepstudy = as_plain(lme4::sleepstudy, c("Subject", "Days", "Reaction")),
  orthodont = as_plain(nlme::Orthodont, c("Subject", "age", "distance", "Sex")),
  chickweight = as_plain(datasets::ChickWeight, c("Chick", "Time", "weight", "Diet")),
  penicillin = as_plain(lme4::Penicillin, c("plate", "sample", "diameter")),
  pastes = as_plain(lme4::Pastes, c("batch", "cask", "strength"))
)
for (name in names(public)) {
  write.csv(public[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

# ------------------------------------------------------------------------------ simulated nested and crossed studies
# Each with its own seed; outcomes rounded to 3 decimals so the CSV holds exactly the numbers fitted.

simulate_schools <- function() {
  # Pupils in schools measured yearly; pupil labels p1..p8 repeat across schools (nested), 15% of
  # the visits after year 0 missing (unbalanced).
  set.seed(301)
  schools <- sprintf("s%02d", 1:30)
  pupils <- sprintf("p%d", 1:8)
  grid <- expand.grid(year = 0:3, pupil = pupils, school = schools, stringsAsFactors = FALSE)
  s <- match(grid$school, schools)
  p <- (s - 1) * length(pupils) + match(grid$pupil, pupils)
  school_int <- rnorm(length(schools), 0, 4)
  school_slope <- rnorm(length(schools), 0, 0.8)
  pupil_int <- rnorm(length(schools) * length(pupils), 0, 3)
  grid$score <- round(50 + 2 * grid$year + school_int[s] + school_slope[s] * grid$year + pupil_int[p] +
                        rnorm(nrow(grid), 0, 2), 3)
  keep <- grid$year == 0 | runif(nrow(grid)) > 0.15
  grid[keep, c("school", "pupil", "year", "score")]
}

simulate_dogs <- function() {
  # Both sides (L, R) of each dog scanned on the same days; side labels repeat across dogs; breed is a
  # per-dog categorical covariate; correlated random intercept and slope per dog, intercept per side.
  set.seed(302)
  dogs <- sprintf("d%02d", 1:36)
  grid <- expand.grid(t = 0:4, side = c("L", "R"), dog = dogs, stringsAsFactors = FALSE)
  d <- match(grid$dog, dogs)
  k <- (d - 1) * 2 + match(grid$side, c("L", "R"))
  breed <- rep(c("beagle", "collie", "terrier"), length.out = length(dogs))
  grid$breed <- breed[d]
  z1 <- rnorm(length(dogs))
  z2 <- rnorm(length(dogs))
  dog_int <- 2 * z1
  dog_slope <- 0.5 * (0.3 * z1 + sqrt(1 - 0.3^2) * z2)
  side_int <- rnorm(2 * length(dogs), 0, 1.2)
  breed_effect <- c(beagle = 0, collie = 1.5, terrier = -1)[grid$breed]
  grid$y <- round(10 + 1.5 * grid$t + breed_effect + dog_int[d] + dog_slope[d] * grid$t + side_int[k] +
                    rnorm(nrow(grid), 0, 1), 3)
  keep <- grid$t == 0 | runif(nrow(grid)) > 0.1
  grid[keep, c("dog", "side", "breed", "t", "y")]
}

simulate_raters <- function() {
  # Patients seen at 6 visits, each visit scored by one of 8 raters drawn at random (crossed), arm per
  # patient; correlated random intercept and slope per patient, intercept per rater.
  set.seed(303)
  patients <- sprintf("pt%03d", 1:80)
  raters <- sprintf("r%d", 1:8)
  grid <- expand.grid(t = 0:5, patient = patients, stringsAsFactors = FALSE)
  i <- match(grid$patient, patients)
  grid$rater <- sample(raters, nrow(grid), replace = TRUE)
  r <- match(grid$rater, raters)
  grid$arm <- rep(c("control", "treatment"), length.out = length(patients))[i]
  z1 <- rnorm(length(patients))
  z2 <- rnorm(length(patients))
  rater_int <- rnorm(length(raters), 0, 1.5)
  grid$y <- round(20 + 0.8 * grid$t - 0.5 * grid$t * (grid$arm == "treatment") + 3 * z1[i] +
                    0.6 * (-0.2 * z1[i] + sqrt(1 - 0.2^2) * z2[i]) * grid$t + rater_int[r] +
                    rnorm(nrow(grid), 0, 1.5), 3)
  grid[, c("patient", "rater", "arm", "t", "y")]
}

simulated <- list(sim_school = simulate_schools(), sim_dogs = simulate_dogs(), sim_raters = simulate_raters())
for (name in names(simulated)) {
  write.csv(simulated[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
}

# ------------------------------------------------------------------------------ fitting

read_dataset <- function(name, spec) {
  frame <- read.csv(file.path(data_dir, paste0(name, ".csv")), stringsAsFactors = FALSE)
  for (column in spec$factors) {
    frame[[column]] <- factor(as.character(frame[[column]]))
  }
  frame
}

multi_factor <- function(spec) isTRUE(spec$multilevel)

# The grouping factor of row i of as.data.frame(VarCorr(fit)) as the data columns it combines
# ("cask:batch" -> batch, cask). Its rows list, bar by bar in getME(fit, "cnms") order, the q SDs then
# the q(q - 1)/2 correlations. Added only for the nested and crossed data sets, so the one-factor
# entries stay as they were.
with_factors <- function(record, i, fit, spec) {
  if (!multi_factor(spec)) return(record)
  cnms <- getME(fit, "cnms")
  row_factor <- rep(names(cnms), vapply(cnms, function(x) length(x) * (length(x) + 1) / 2, 1))
  record$factors <- I(sort(strsplit(row_factor[[i]], ":", fixed = TRUE)[[1]]))
  record
}

fit_record <- function(formula, frame, spec, reml) {
  run <- capture(lmer(as.formula(formula), data = frame, REML = reml))
  fit <- run$value
  if (!is(fit, "merMod")) stop(formula, ": ", fit$error)  # every reference fit must succeed
  captured <- run$messages
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
    random_effects = lapply(which(is_sd), function(i) with_factors(list(
      grp = vc$grp[[i]], group = spec$subject, term = vc$var1[[i]],
      variance = vc$vcov[[i]], sd = vc$sdcor[[i]]
    ), i, fit, spec)),
    correlations = lapply(which(is_corr), function(i) with_factors(list(
      grp = vc$grp[[i]], group = spec$subject, term1 = vc$var1[[i]], term2 = vc$var2[[i]],
      corr = vc$sdcor[[i]]
    ), i, fit, spec)),
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
