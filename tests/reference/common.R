# Shared by the reference scripts (make_reference.R, make_reference_units.R, make_reference_covariance.R):
# where the reference data live, how a data frame is exported (factors as plain text, no row names), and how a
# fit is run with its warnings and messages captured.
# Source it from the repository root: source(file.path("tests", "reference", "common.R"))

ref_dir <- file.path("tests", "reference")
data_dir <- file.path(ref_dir, "data")
if (!dir.exists(data_dir)) {
  stop("run from the repository root: ", data_dir, " not found")
}

as_plain <- function(frame, columns) {
  frame <- as.data.frame(frame)[, columns]
  for (column in columns) {
    if (is.factor(frame[[column]])) frame[[column]] <- as.character(frame[[column]])
  }
  rownames(frame) <- NULL
  frame
}

# Evaluate `expr` with every warning and message captured; an error becomes list(error = text).
capture <- function(expr) {
  captured <- character()
  t0 <- proc.time()[["elapsed"]]
  value <- tryCatch(
    withCallingHandlers(
      expr,
      warning = function(w) {
        captured <<- c(captured, conditionMessage(w))
        invokeRestart("muffleWarning")
      },
      message = function(m) {
        captured <<- c(captured, trimws(conditionMessage(m)))
        invokeRestart("muffleMessage")
      }
    ),
    error = function(e) list(error = conditionMessage(e))
  )
  list(value = value, messages = captured, seconds = proc.time()[["elapsed"]] - t0)
}

