# ICC and R² (Nakagawa, Johnson & Schielzeth 2017) as the R package performance computes them, for
# tests/inference/test_variance.py: performance::icc()'s ICC_adjusted and performance::r2_nakagawa()'s
# R2_marginal and R2_conditional of lmer REML fits (lme4's defaults; deterministic, no seed needed).
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

cases <- list(
  list(name = "sleepstudy_slopes", data = "tests/fixtures/sleepstudy.csv", frame = sleepstudy,
       formula = "Reaction ~ Days + (Days | Subject)"),
  list(name = "sleepstudy_intercept", data = "tests/fixtures/sleepstudy.csv", frame = sleepstudy,
       formula = "Reaction ~ Days + (1 | Subject)"),
  list(name = "orthodont_intercept", data = "tests/reference/data/orthodont.csv", frame = orthodont,
       formula = "distance ~ age * Sex + (1 | Subject)")
)

results <- lapply(cases, function(case) {
  m <- lmer(as.formula(case$formula), data = case$frame, REML = TRUE)
  r2 <- r2_nakagawa(m)
  icc_value <- icc(m)
  list(
    name = case$name,
    data = case$data,
    formula = case$formula,
    r2_marginal = unname(r2$R2_marginal),
    r2_conditional = unname(r2$R2_conditional),
    icc_adjusted = unname(icc_value$ICC_adjusted),
    icc_unadjusted = unname(icc_value$ICC_unadjusted)
  )
})

document <- list(
  generated_by = "tests/reference/make_reference_r2.R",
  versions = list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                  performance = as.character(packageVersion("performance"))),
  cases = results
)
write_json(document, file.path(ref_dir, "r2_reference.json"), auto_unbox = TRUE, digits = NA, pretty = TRUE)
