# ICC and R² (Nakagawa, Johnson & Schielzeth 2017) as the R package performance computes them, for
# tests/inference/test_variance.py: performance::icc()'s ICC_adjusted and performance::r2_nakagawa()'s
# R2_marginal and R2_conditional of lmer REML fits and of glmer fits (binomial logit, Poisson log; ML by
# Laplace, lme4's defaults otherwise), deterministic, no seed needed. For a GLMM, performance's
# distribution-specific variance is pi^2/3 (logit) or log(1 + 1/lambda) (log link, lambda = exp of the intercept
# of the null model y ~ 1 + the same random effects, refitted by insight::null_model); `null_intercept` records it. On epil performance warns
# "mu of 5.1 is too close to zero, estimate of random effect variances may be unreliable" (lambda < 6): expected.
# Run from the repository root:  Rscript tests/reference/make_reference_r2.R
# Writes tests/reference/r2_reference.json.

suppressPackageStartupMessages({
  library(lme4)
  library(performance)
  library(jsonlite)
})
source(file.path("tests", "reference", "common.R"))

sleepstudy <- read.csv(file.path("tests", "fixtures", "sleepstudy.csv"), stringsAsFactors = TRUE)
orthodont <- read.csv(file.path(data_dir, "orthodont.csv"), stringsAsFactors = TRUE)
sleepstudy$Subject <- factor(sleepstudy$Subject)

bacteria <- read.csv(file.path(data_dir, "glmm_bacteria.csv"), stringsAsFactors = TRUE)
epil <- read.csv(file.path(data_dir, "glmm_epil.csv"))
for (column in c("subject", "trt")) epil[[column]] <- factor(epil[[column]])

cases <- list(
  list(name = "sleepstudy_slopes", data = "tests/fixtures/sleepstudy.csv", frame = sleepstudy,
       formula = "Reaction ~ Days + (Days | Subject)"),
  list(name = "sleepstudy_intercept", data = "tests/fixtures/sleepstudy.csv", frame = sleepstudy,
       formula = "Reaction ~ Days + (1 | Subject)"),
  list(name = "orthodont_intercept", data = "tests/reference/data/orthodont.csv", frame = orthodont,
       formula = "distance ~ age * Sex + (1 | Subject)"),
  list(name = "bacteria_intercept", data = "tests/reference/data/glmm_bacteria.csv", frame = bacteria,
       formula = "y01 ~ trt + week_gt2 + (1 | ID)", family = "binomial"),
  list(name = "epil_intercept", data = "tests/reference/data/glmm_epil.csv", frame = epil,
       formula = "y ~ lbase * trt + lage + V4 + (1 | subject)", family = "poisson")
)

results <- lapply(cases, function(case) {
  family <- if (is.null(case$family)) "gaussian" else case$family
  m <- if (family == "gaussian") {
    lmer(as.formula(case$formula), data = case$frame, REML = TRUE)
  } else {
    glmer(as.formula(case$formula), data = case$frame, family = family)
  }
  r2 <- r2_nakagawa(m)
  icc_value <- icc(m)
  variances <- insight::get_variance(m)
  out <- list(
    name = case$name,
    data = case$data,
    formula = case$formula,
    family = family,
    r2_marginal = unname(r2$R2_marginal),
    r2_conditional = unname(r2$R2_conditional),
    icc_adjusted = unname(icc_value$ICC_adjusted),
    icc_unadjusted = unname(icc_value$ICC_unadjusted),
    var_fixed = unname(variances$var.fixed),
    var_random = unname(variances$var.random),
    var_distribution = unname(variances$var.distribution)
  )
  if (family == "poisson") out$null_intercept <- unname(fixef(insight::null_model(m))[[1]])
  out
})

document <- list(
  generated_by = "tests/reference/make_reference_r2.R",
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                  performance = as.character(packageVersion("performance")),
                  insight = as.character(packageVersion("insight"))),
  cases = results
)
write_json(document, file.path(ref_dir, "r2_reference.json"), auto_unbox = TRUE, digits = NA, pretty = TRUE)
