# Held-out glmer references for issue 14: public longitudinal binary and count data the GLMM engine was not
# developed on (geepack::ohio, geepack::respiratory, glmmTMB::Salamanders), fitted by glmer with a tight PIRLS
# tolerance (glmer's default 1e-7 reports a logLik a little below the Laplace value at its own estimates).
#
# Run from the repository root:   Rscript tests/reference/make_reference_glmm_heldout.R
# Needs R with lme4, geepack, glmmTMB and jsonlite (Debian: r-cran-lme4 r-cran-geepack r-cran-glmmtmb
# r-cran-jsonlite). A few seconds. Writes tests/reference/data/glmm_ho_*.csv and glmer_reference_heldout.json:
# per fit the data file, formula, family, nAGQ, logLik, df, BIC, fixed effects and their SEs, and the BIC
# choice per data set.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))
source(file.path("tests", "reference", "common.R"))  # ref_dir, data_dir, as_plain(), capture()

data(ohio, package = "geepack")
data(respiratory, package = "geepack")
data(Salamanders, package = "glmmTMB")
respiratory$id <- paste(respiratory$center, respiratory$id, sep = "_")  # ids repeat across the two centres

exported <- list(
  glmm_ho_ohio = as_plain(ohio, c("id", "age", "smoke", "resp")),
  glmm_ho_respiratory = as_plain(respiratory, c("id", "center", "treat", "sex", "age", "baseline", "visit", "outcome")),
  glmm_ho_salamanders = as_plain(Salamanders, c("site", "mined", "spp", "cover", "DOY", "Wtemp", "count"))
)
factors <- list(glmm_ho_ohio = "id", glmm_ho_respiratory = c("id", "center", "treat", "sex"),
                glmm_ho_salamanders = c("site", "mined", "spp"))
exported$glmm_ho_ohio$id <- as.character(exported$glmm_ho_ohio$id)
for (name in names(exported)) write.csv(exported[[name]], file.path(data_dir, paste0(name, ".csv")), row.names = FALSE)

models <- list(
  glmm_ho_ohio = list(
    ri = list("resp ~ age + smoke + (1 | id)", "binomial", 1),
    ri_agq12 = list("resp ~ age + smoke + (1 | id)", "binomial", 12),
    ris = list("resp ~ age + smoke + (age | id)", "binomial", 1)),
  glmm_ho_respiratory = list(
    ri = list("outcome ~ treat + baseline + visit + sex + age + (1 | id)", "binomial", 1),
    ris = list("outcome ~ treat + baseline + visit + sex + age + (visit | id)", "binomial", 1),
    nested = list("outcome ~ treat + baseline + visit + sex + age + (1 | center/id)", "binomial", 1)),
  glmm_ho_salamanders = list(
    additive = list("count ~ mined + spp + cover + (1 | site)", "poisson", 1),
    interaction = list("count ~ mined * spp + cover + (1 | site)", "poisson", 1))
)

control <- glmerControl(tolPwrss = 1e-12, optimizer = "bobyqa", optCtrl = list(maxfun = 1e5))
fits <- list()
choices <- list()
for (dataset in names(models)) {
  frame <- read.csv(file.path(data_dir, paste0(dataset, ".csv")), stringsAsFactors = FALSE)
  for (column in factors[[dataset]]) frame[[column]] <- factor(as.character(frame[[column]]))
  fits[[dataset]] <- list()
  for (name in names(models[[dataset]])) {
    spec <- models[[dataset]][[name]]
    run <- capture(glmer(as.formula(spec[[1]]), data = frame, family = spec[[2]], nAGQ = spec[[3]], control = control))
    fit <- run$value
    ll <- logLik(fit)
    fits[[dataset]][[name]] <- list(
      formula = spec[[1]], family = spec[[2]], nagq = spec[[3]], logLik = as.numeric(ll),
      df = as.integer(attr(ll, "df")), BIC = BIC(fit), messages = as.list(run$messages),
      fixed_effects = lapply(as.list(fixef(fit)), function(v) v),
      std_errors = as.list(setNames(sqrt(diag(as.matrix(vcov(fit)))), names(fixef(fit))))
    )
    cat(sprintf("%-22s %-12s logLik %.6f df %d %s\n", dataset, name, as.numeric(ll), attr(ll, "df"),
                paste(run$messages, collapse = "; ")))
  }
  laplace <- Filter(function(f) f$nagq == 1, fits[[dataset]])
  choices[[dataset]] <- names(laplace)[which.min(vapply(laplace, function(f) f$BIC, 0))]
}

reference <- list(
  generated_by = "Rscript tests/reference/make_reference_glmm_heldout.R", R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")), control = "glmerControl(tolPwrss = 1e-12, optimizer = \"bobyqa\", optCtrl = list(maxfun = 1e5))",
  factors = factors, fits = fits, bic_choice_among_laplace_fits = choices
)
writeLines(toJSON(reference, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null"),
           file.path(ref_dir, "glmer_reference_heldout.json"))
