# Reference numbers for issue 16 (the Python fitting API): what a user of lme4 reads off a fit and its
# predictions, on public longitudinal data sets the project had not used before: fixed effects (lmerTest's
# Satterthwaite df and p for lmer fits), REML criterion, logLik, AIC, BIC, sigma, VarCorr, the conditional
# modes with their conditional SDs, predictions on new data (known subjects at new times, a subject not in the
# data, a known outer level with an unknown inner level), an ML fit and the likelihood-ratio test of anova().
#
# Run from the repository root:   Rscript tests/reference/make_reference_api.R
# Needs R with lme4, lmerTest, nlme, HSAUR3 (data only) and jsonlite. A few seconds. Writes
# tests/reference/data/api_*.csv (each data set and its newdata frame) and tests/reference/api_reference.json;
# every fit reads its data back from the CSV, so R fits exactly the numbers Python reads.
#
# Conventions (as make_reference.R): the `factors` columns become factor(as.character(x)) under the C
# collation, every other column stays numeric. Every LMM is fitted with lmerTest's lmer and
# lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)) (lme4's default stops
# short enough to move SEs by 0.2%), the GLMM by Laplace (nAGQ = 1) with NLopt's BOBYQA (glmm_control below).
#
# Predictions: predict(fit, newdata, allow.new.levels = TRUE) (conditional: a level the fit has not seen
# contributes 0, i.e. the population prediction for that grouping factor only) and predict(fit, newdata,
# re.form = NA) (population); for the GLMM both on the link and on the response scale. A poly() term is
# evaluated at the new times with the training data's coefficients (predict.poly), as lme4 does.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

lmm_control <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
# The GLMM by NLopt's BOBYQA at absolute tolerances near machine precision and tolPwrss = 1e-12 (as
# make_reference_glmm.R): glmer's bobyqa at rhoend = 1e-12 stops with the deviance 1.3e-11 above the optimum and
# the onset coefficient 7.7e-6 relative away from it (BFGS on glmer's own deviance function, started there, lands
# within 1e-6 of this fit), and at glmer's default tolPwrss (1e-7) the logLik is 7.1e-6 low (`optimum_checks`).
tight_nlopt <- list(xtol_abs = 1e-14, ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5)
glmm_control <- glmerControl(optimizer = "nloptwrap", tolPwrss = 1e-12, optCtrl = tight_nlopt)

# --- data ------------------------------------------------------------------------------------------------

data(schizophrenia2, package = "HSAUR3")
schizophrenia <- schizophrenia2[!is.na(schizophrenia2$disorder), ]  # 16 missed visits (dropout)
schizophrenia$disorder <- as.integer(schizophrenia$disorder == "present")

exported <- list(
  api_loblolly = as_plain(datasets::Loblolly, c("Seed", "age", "height")),
  api_milk = as_plain(nlme::Milk, c("Cow", "Diet", "Time", "protein")),
  api_pixel = as_plain(nlme::Pixel, c("Dog", "Side", "day", "pixel")),
  api_schizophrenia = as_plain(schizophrenia, c("subject", "onset", "month", "disorder"))
)

# New data: known subjects at times not in the data (between, and past the last), and subjects not in the data.
newdata <- list(
  api_loblolly = data.frame(Seed = c("301", "301", "329", "999", "999", "999"),
                            age = c(7, 12, 30, 5, 10, 20)),
  api_milk = data.frame(Cow = c("B01", "B01", "L15", "BL07", "BL07", "N01", "N01"),
                        Diet = c("barley", "barley", "lupins", "barley+lupins", "barley+lupins", "lupins", "lupins"),
                        Time = c(7.5, 20, 12.5, 3, 21, 1, 10)),
  # Dog 2 with Side "M": the Dog is known, the Dog:Side level is not; Dog 11 is not in the data at all.
  api_pixel = data.frame(Dog = c("1", "1", "4", "2", "2", "11", "11"),
                         Side = c("L", "L", "R", "M", "M", "L", "R"),
                         day = c(3, 12, 25, 5, 9, 5, 9)),
  api_schizophrenia = data.frame(subject = c("1", "1", "10", "99", "99", "98"),
                                 onset = c("< 20 yrs", "< 20 yrs", "> 20 yrs", "< 20 yrs", "< 20 yrs", "> 20 yrs"),
                                 month = c(4, 12, 1, 0, 6, 3))
)

for (name in names(exported)) {
  stopifnot(!anyNA(exported[[name]]))
  write.csv(exported[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)
  write.csv(newdata[[name]], file.path(data_dir, paste0(name, "_newdata.csv")), row.names = FALSE)
}

sources <- list(
  api_loblolly = "datasets::Loblolly (14 seed sources of loblolly pine, heights at ages 3 to 25 years)",
  api_milk = "nlme::Milk (protein content of milk, 79 cows on 3 diets, weekly for up to 19 weeks)",
  api_pixel = "nlme::Pixel (CT pixel intensity of lymph nodes, 10 dogs, left and right side, days 0 to 21)",
  api_schizophrenia = "HSAUR3::schizophrenia2 (thought disorder present = 1, 44 women, months 0 to 10, missed visits dropped)"
)

# --- cases -----------------------------------------------------------------------------------------------

cases <- list(
  list(name = "loblolly_slopes", data = "api_loblolly", formula = "height ~ age + I(age^2) + (age | Seed)",
       factors = "Seed", family = "gaussian", reml = TRUE),
  list(name = "milk_poly_diet", data = "api_milk", formula = "protein ~ poly(Time, 2) * Diet + (Time | Cow)",
       factors = c("Cow", "Diet"), family = "gaussian", reml = TRUE),
  list(name = "pixel_nested", data = "api_pixel", formula = "pixel ~ day + I(day^2) + (day | Dog) + (1 | Dog:Side)",
       factors = c("Dog", "Side"), family = "gaussian", reml = TRUE),
  list(name = "schizophrenia_binomial", data = "api_schizophrenia", formula = "disorder ~ onset * month + (1 | subject)",
       factors = c("subject", "onset"), family = "binomial", reml = FALSE),
  # ML fits, for anova(): the interaction of the polynomial in Time with Diet, 4 df.
  list(name = "milk_poly_diet_ml", data = "api_milk", formula = "protein ~ poly(Time, 2) * Diet + (Time | Cow)",
       factors = c("Cow", "Diet"), family = "gaussian", reml = FALSE),
  list(name = "milk_poly_plus_diet_ml", data = "api_milk", formula = "protein ~ poly(Time, 2) + Diet + (Time | Cow)",
       factors = c("Cow", "Diet"), family = "gaussian", reml = FALSE)
)

read_frame <- function(file, factors) {
  frame <- read.csv(file.path(data_dir, file), stringsAsFactors = FALSE)
  for (column in intersect(factors, names(frame))) frame[[column]] <- factor(as.character(frame[[column]]))
  frame
}

# --- extraction ------------------------------------------------------------------------------------------

variance_components <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  lapply(seq_len(nrow(vc)), function(i) {
    list(grp = vc$grp[i], var1 = if (is.na(vc$var1[i])) NULL else vc$var1[i],
         var2 = if (is.na(vc$var2[i])) NULL else vc$var2[i], vcov = vc$vcov[i], sdcor = vc$sdcor[i])
  })
}

# One row per grouping factor, level and term: the conditional mode and its conditional SD.
conditional_modes <- function(fit) {
  re <- as.data.frame(ranef(fit, condVar = TRUE))
  list(grpvar = as.character(re$grpvar), term = as.character(re$term), grp = as.character(re$grp),
       condval = re$condval, condsd = re$condsd)
}

fixed_block <- function(fit, family) {
  coefficients <- summary(fit)$coefficients
  out <- list(term = rownames(coefficients), estimate = unname(coefficients[, "Estimate"]),
              se = unname(coefficients[, "Std. Error"]))
  if (family == "gaussian") {
    out$df <- unname(coefficients[, "df"])
    out$t <- unname(coefficients[, "t value"])
    out$p <- unname(coefficients[, "Pr(>|t|)"])
    # lmerTest's 95% intervals with the Satterthwaite df, one coefficient at a time.
    intervals <- contest(fit, diag(nrow(coefficients)), joint = FALSE, confint = TRUE, level = 0.95)
    out$ci_low <- unname(intervals$lower)
    out$ci_high <- unname(intervals$upper)
  } else {
    out$z <- unname(coefficients[, "z value"])
    out$p <- unname(coefficients[, "Pr(>|z|)"])
    intervals <- confint(fit, parm = "beta_", method = "Wald", level = 0.95)
    stopifnot(identical(rownames(intervals), rownames(coefficients)))
    out$ci_low <- unname(intervals[, 1])
    out$ci_high <- unname(intervals[, 2])
  }
  out
}

prediction_block <- function(fit, new, family) {
  if (family == "gaussian") {
    return(list(conditional = unname(predict(fit, new, allow.new.levels = TRUE)),
                population = unname(predict(fit, new, re.form = NA))))
  }
  list(conditional = unname(predict(fit, new, allow.new.levels = TRUE, type = "link")),
       population = unname(predict(fit, new, re.form = NA, type = "link")),
       conditional_response = unname(predict(fit, new, allow.new.levels = TRUE, type = "response")),
       population_response = unname(predict(fit, new, re.form = NA, type = "response")))
}

fit_case <- function(case, frame) {
  formula <- as.formula(case$formula)
  if (case$family == "gaussian") {
    run <- capture(lmer(formula, data = frame, REML = case$reml, control = lmm_control))
    stopifnot(inherits(run$value, "lmerModLmerTest"))
  } else {
    run <- capture(glmer(formula, data = frame, family = case$family, nAGQ = 1, control = glmm_control))
    stopifnot(inherits(run$value, "glmerMod"))
  }
  run
}

# How well the optimum pins the reported numbers down: other fits of the same model (lmer: NLopt's BOBYQA at
# absolute tolerances near machine precision, and lmer's defaults; glmer: bobyqa at rhoend = 1e-12, with
# tolPwrss = 1e-12 and with glmer's default), each with its distance from the reference fit in the
# log-likelihood, the conditional modes (in SDs of their term) and SDs, the fixed effects, their SEs and the
# predictions.
alternative_controls <- function(family) {
  if (family == "gaussian") {
    return(list("nloptwrap (NLopt BOBYQA), xtol_abs = 1e-14, ftol_abs = 1e-15" = lmerControl(
                  optimizer = "nloptwrap", optCtrl = tight_nlopt),
                "lmer's default (nloptwrap, xtol_abs = ftol_abs = 1e-8)" = lmerControl()))
  }
  list("bobyqa, rhoend = 1e-12, tolPwrss = 1e-12" = glmerControl(
         optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5), tolPwrss = 1e-12),
       "bobyqa, rhoend = 1e-12, glmer's default tolPwrss (1e-7)" = glmerControl(
         optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)))
}

optimum_checks <- function(case, frame, new, fit) {
  relative <- function(a, b) max(abs(a / b - 1))
  mine <- prediction_block(fit, new, case$family)
  reference_modes <- conditional_modes(fit)
  controls <- alternative_controls(case$family)
  lapply(names(controls), function(label) {
    run <- capture(if (case$family == "gaussian") {
      lmer(as.formula(case$formula), data = frame, REML = case$reml, control = controls[[label]])
    } else {
      glmer(as.formula(case$formula), data = frame, family = case$family, nAGQ = 1, control = controls[[label]])
    })
    other <- run$value
    theirs <- prediction_block(other, new, case$family)
    modes <- conditional_modes(other)
    sds <- with(as.data.frame(VarCorr(fit)), setNames(sdcor, paste(grp, var1))[is.na(var2)])
    list(fit = label, messages = I(run$messages),
         loglik_difference = as.numeric(logLik(other)) - as.numeric(logLik(fit)),
         ranef_max_difference_in_sds = max(abs(modes$condval - reference_modes$condval) /
                                             sds[paste(modes$grpvar, modes$term)]),
         condsd_max_rel_difference = relative(modes$condsd, reference_modes$condsd),
         fixed_max_rel_difference = relative(fixef(other), fixef(fit)),
         se_max_rel_difference = relative(sqrt(diag(as.matrix(vcov(other)))), sqrt(diag(as.matrix(vcov(fit))))),
         predict_max_rel_difference = max(relative(theirs$conditional, mine$conditional),
                                          relative(theirs$population, mine$population)))
  })
}

fits <- list()
results <- list()
for (case in cases) {
  frame <- read_frame(paste0(case$data, ".csv"), case$factors)
  new <- read_frame(paste0(case$data, "_newdata.csv"), case$factors)
  run <- fit_case(case, frame)
  fit <- run$value
  fits[[case$name]] <- fit
  record <- list(name = case$name, data = paste0(case$data, ".csv"), newdata = paste0(case$data, "_newdata.csv"),
                 source = sources[[case$data]], formula = case$formula, factors = I(case$factors),
                 family = case$family, reml = case$reml, n_obs = nobs(fit), n_groups = as.list(getME(fit, "l_i")),
                 fit_messages = I(run$messages), singular = isSingular(fit),
                 fixed = fixed_block(fit, case$family),
                 reml_criterion = if (case$reml) unname(REMLcrit(fit)) else NULL,
                 deviance = if (case$reml) NULL else unname(deviance(fit)),
                 loglik = as.numeric(logLik(fit)), df = attr(logLik(fit), "df"),
                 aic = AIC(fit), bic = BIC(fit),
                 sigma = if (case$family == "gaussian") sigma(fit) else NULL,
                 theta = I(unname(getME(fit, "theta"))), theta_names = I(names(getME(fit, "theta"))),
                 varcorr = variance_components(fit),
                 ranef = conditional_modes(fit),
                 predict = prediction_block(fit, new, case$family),
                 optimum_checks = optimum_checks(case, frame, new, fit))
  # A level the fit has not seen gets 0 for that grouping factor: rows of wholly new subjects equal the
  # population prediction.
  unseen <- !(as.character(new[[names(fit@flist)[length(fit@flist)]]]) %in% levels(fit@flist[[length(fit@flist)]]))
  stopifnot(isTRUE(all.equal(record$predict$conditional[unseen], record$predict$population[unseen], tolerance = 1e-12)))
  results[[length(results) + 1]] <- record[!vapply(record, is.null, logical(1))]
}

# --- anova -----------------------------------------------------------------------------------------------

# anova() of two lmer fits refits REML fits by ML (refit = TRUE, the default); here the fits are ML already, and
# the REML fit of the bigger model gives the same table (checked below).
comparison <- anova(fits[["milk_poly_plus_diet_ml"]], fits[["milk_poly_diet_ml"]])
milk <- read_frame("api_milk.csv", c("Cow", "Diet"))
reml_small <- lmer(as.formula(cases[[6]]$formula), data = milk, REML = TRUE, control = lmm_control)
reml_big <- lmer(as.formula(cases[[5]]$formula), data = milk, REML = TRUE, control = lmm_control)
from_reml <- capture(anova(reml_small, reml_big))$value  # "refitting model(s) with ML (instead of REML)"
stopifnot(isTRUE(all.equal(comparison$Chisq, from_reml$Chisq, tolerance = 1e-6)))
anova_rows <- lapply(seq_len(nrow(comparison)), function(i) {
  value <- function(column) if (is.na(comparison[[column]][i])) NULL else comparison[[column]][i]
  list(model = c("milk_poly_plus_diet_ml", "milk_poly_diet_ml")[i], npar = comparison$npar[i],
       AIC = comparison$AIC[i], BIC = comparison$BIC[i], logLik = comparison$logLik[i],
       deviance = comparison$deviance[i], Chisq = value("Chisq"), Df = value("Df"), p = value("Pr(>Chisq)"))
})

versions <- list(R = R.version.string)
for (package in c("lme4", "lmerTest", "Matrix", "nlme", "HSAUR3", "jsonlite")) {
  versions[[package]] <- as.character(packageVersion(package))
}
document <- list(
  meta = list(
    generated_by = "tests/reference/make_reference_api.R",
    versions = versions,
    lmer_control = "lmerTest::lmer(..., control = lmerControl(optimizer = \"bobyqa\", optCtrl = list(rhoend = 1e-12, maxfun = 1e5)))",
    glmer_control = paste("glmerControl(optimizer = \"nloptwrap\", tolPwrss = 1e-12, optCtrl = list(xtol_abs = 1e-14,",
                          "ftol_abs = 1e-15, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5)), nAGQ = 1"),
    fixed = paste("summary(fit)$coefficients with lmerTest loaded: Satterthwaite df and p for lmer fits, Wald z for",
                  "glmer; ci_low, ci_high: contest(fit, diag(p), joint = FALSE, confint = TRUE) (lmer),",
                  "confint(fit, parm = \"beta_\", method = \"Wald\") (glmer), 95%"),
    ranef = "as.data.frame(ranef(fit, condVar = TRUE)): condval, condsd per grpvar, term, grp",
    predict = paste("predict(fit, newdata, allow.new.levels = TRUE) (conditional) and predict(fit, newdata, re.form = NA)",
                    "(population); glmer: type = \"link\" (conditional, population) and \"response\""),
    aic_bic = "AIC(fit), BIC(fit): of the REML log-likelihood for REML fits (as lme4 prints them), BIC with n = rows",
    anova = "anova(small, big) of the two ML fits; anova() of the REML fits (refit = TRUE) gives the same Chisq"
  ),
  cases = results,
  anova = list(models = I(c("milk_poly_plus_diet_ml", "milk_poly_diet_ml")), rows = anova_rows)
)
write_json(document, file.path(ref_dir, "api_reference.json"), auto_unbox = TRUE, digits = NA,
           pretty = TRUE, null = "null", na = "null")
