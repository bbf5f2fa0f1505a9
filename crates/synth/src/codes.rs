//! Terminology used by the generator: code systems and the clinical codes
//! Synthea commonly emits (SNOMED CT, LOINC, RxNorm, UCUM).

use serde_json::Value;

pub(crate) const SNOMED: &str = "http://snomed.info/sct";
pub(crate) const LOINC: &str = "http://loinc.org";
pub(crate) const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
pub(crate) const UCUM: &str = "http://unitsofmeasure.org";
pub(crate) const SYNTHEA: &str = "https://github.com/synthetichealth/synthea";
pub(crate) const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
pub(crate) const SSN: &str = "http://hl7.org/fhir/sid/us-ssn";
pub(crate) const MRN: &str = "http://hospital.smarthealthit.org";
pub(crate) const DRIVERS_LICENSE: &str = "urn:oid:2.16.840.1.113883.4.3.25";
pub(crate) const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
pub(crate) const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub(crate) const MARITAL: &str = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus";
pub(crate) const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
pub(crate) const OBS_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
pub(crate) const COND_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
pub(crate) const COND_VER: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
pub(crate) const COND_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";
pub(crate) const ALLERGY_CLINICAL: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical";
pub(crate) const ALLERGY_VER: &str =
    "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification";
pub(crate) const ORG_TYPE: &str = "http://terminology.hl7.org/CodeSystem/organization-type";
pub(crate) const SUBSCRIBER_REL: &str =
    "http://terminology.hl7.org/CodeSystem/subscriber-relationship";
pub(crate) const MEMBER_ID: &str = "https://payer.example.org/member";
pub(crate) const DEVICE_SERIAL: &str = "urn:oid:2.16.840.1.113883.3.3719";
pub(crate) const BIRTH_SEX: &str =
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex";

/// A code with its system and display text.
#[derive(Clone, Copy)]
pub(crate) struct Code {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

const fn sct(code: &'static str, display: &'static str) -> Code {
    Code {
        system: SNOMED,
        code,
        display,
    }
}

const fn rx(code: &'static str, display: &'static str) -> Code {
    Code {
        system: RXNORM,
        code,
        display,
    }
}

const fn loinc(code: &'static str, display: &'static str) -> Code {
    Code {
        system: LOINC,
        code,
        display,
    }
}

impl Code {
    /// A `Coding`.
    pub fn coding(&self) -> Value {
        obj! {"system": self.system, "code": self.code, "display": self.display}
    }

    /// A `CodeableConcept` with one coding and its display as text.
    pub fn concept(&self) -> Value {
        obj! {"coding": [self.coding()], "text": self.display}
    }
}

/// A `CodeableConcept` with a bare coding (no text), as used for statuses.
pub(crate) fn status_concept(system: &str, code: &str) -> Value {
    obj! {"coding": [obj!{"system": system, "code": code}]}
}

// --- Encounters -----------------------------------------------------------

pub(crate) const CHECK_UP: Code = sct("185349003", "Encounter for check up (procedure)");
pub(crate) const GENERAL_EXAM: Code =
    sct("162673000", "General examination of patient (procedure)");
pub(crate) const SYMPTOM: Code = sct("185345009", "Encounter for symptom (procedure)");
pub(crate) const FOLLOW_UP: Code = sct("390906007", "Follow-up encounter (procedure)");
pub(crate) const WELL_CHILD: Code = sct("410620009", "Well child visit (procedure)");
pub(crate) const EMERGENCY: Code = sct("50849002", "Emergency room admission (procedure)");
pub(crate) const ADMISSION: Code = sct("32485007", "Hospital admission (procedure)");

// --- Conditions -----------------------------------------------------------

/// A condition the generator can diagnose.
pub(crate) struct ConditionDef {
    pub code: Code,
    /// Chronic conditions stay active; acute ones resolve after a few weeks.
    pub chronic: bool,
    /// Medications that treat it (first one preferred).
    pub meds: &'static [Code],
}

pub(crate) const METFORMIN: Code = rx(
    "860975",
    "24 HR Metformin hydrochloride 500 MG Extended Release Oral Tablet",
);
pub(crate) const LISINOPRIL: Code = rx("314076", "lisinopril 10 MG Oral Tablet");
pub(crate) const AMLODIPINE: Code = rx("197361", "amlodipine 5 MG Oral Tablet");
pub(crate) const HCTZ: Code = rx("310798", "Hydrochlorothiazide 25 MG Oral Tablet");
pub(crate) const AMOXICILLIN: Code = rx("308182", "Amoxicillin 250 MG Oral Capsule");
pub(crate) const AMOX_CLAV: Code = rx(
    "562251",
    "Amoxicillin 250 MG / Clavulanate 125 MG Oral Tablet",
);
pub(crate) const PENICILLIN_V: Code = rx("834061", "Penicillin V Potassium 250 MG Oral Tablet");
pub(crate) const ACETAMINOPHEN: Code = rx("313782", "Acetaminophen 325 MG Oral Tablet");
pub(crate) const SIMVASTATIN: Code = rx("314231", "Simvastatin 10 MG Oral Tablet");
pub(crate) const ATORVASTATIN: Code = rx("259255", "Atorvastatin 80 MG Oral Tablet");
pub(crate) const ALBUTEROL: Code = rx(
    "745679",
    "200 ACTUAT Albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
);
pub(crate) const FERROUS_SULFATE: Code = rx("310325", "ferrous sulfate 325 MG Oral Tablet");

pub(crate) const DIABETES: ConditionDef = ConditionDef {
    code: sct("44054006", "Diabetes mellitus type 2 (disorder)"),
    chronic: true,
    meds: &[METFORMIN],
};
pub(crate) const PREDIABETES: ConditionDef = ConditionDef {
    code: sct("15777000", "Prediabetes"),
    chronic: true,
    meds: &[],
};
pub(crate) const HYPERTENSION: ConditionDef = ConditionDef {
    code: sct("38341003", "Hypertension"),
    chronic: true,
    meds: &[LISINOPRIL, AMLODIPINE, HCTZ],
};
pub(crate) const OBESITY: ConditionDef = ConditionDef {
    code: sct("162864005", "Body mass index 30+ - obesity (finding)"),
    chronic: true,
    meds: &[],
};
pub(crate) const HYPERLIPIDEMIA: ConditionDef = ConditionDef {
    code: sct("55822004", "Hyperlipidemia"),
    chronic: true,
    meds: &[SIMVASTATIN, ATORVASTATIN],
};
pub(crate) const ASTHMA: ConditionDef = ConditionDef {
    code: sct("195967001", "Asthma"),
    chronic: true,
    meds: &[ALBUTEROL],
};
pub(crate) const ANEMIA: ConditionDef = ConditionDef {
    code: sct("271737000", "Anemia (disorder)"),
    chronic: true,
    meds: &[FERROUS_SULFATE],
};
pub(crate) const CHRONIC_SINUSITIS: ConditionDef = ConditionDef {
    code: sct("40055000", "Chronic sinusitis (disorder)"),
    chronic: true,
    meds: &[],
};

/// Acute conditions, any of which any patient may catch.
pub(crate) static ACUTE: &[ConditionDef] = &[
    ConditionDef {
        code: sct("195662009", "Acute viral pharyngitis (disorder)"),
        chronic: false,
        meds: &[ACETAMINOPHEN],
    },
    ConditionDef {
        code: sct("10509002", "Acute bronchitis (disorder)"),
        chronic: false,
        meds: &[ACETAMINOPHEN],
    },
    ConditionDef {
        code: sct("444814009", "Viral sinusitis (disorder)"),
        chronic: false,
        meds: &[AMOX_CLAV],
    },
    ConditionDef {
        code: sct("43878008", "Streptococcal sore throat (disorder)"),
        chronic: false,
        meds: &[PENICILLIN_V, AMOXICILLIN],
    },
    ConditionDef {
        code: sct("65363002", "Otitis media"),
        chronic: false,
        meds: &[AMOXICILLIN],
    },
    ConditionDef {
        code: sct("233604007", "Pneumonia"),
        chronic: false,
        meds: &[AMOXICILLIN],
    },
    ConditionDef {
        code: sct("44465007", "Sprain of ankle"),
        chronic: false,
        meds: &[ACETAMINOPHEN],
    },
    ConditionDef {
        code: sct("283371005", "Laceration of forearm"),
        chronic: false,
        meds: &[],
    },
];

// --- Allergies ------------------------------------------------------------

/// An allergy: code, category, and typical criticality.
pub(crate) struct AllergyDef {
    pub code: Code,
    pub category: &'static str,
    pub reaction: Code,
}

const HIVES: Code = sct("247472004", "Wheal (finding)");
const RASH: Code = sct("271807003", "Eruption of skin (disorder)");
const ANAPHYLAXIS: Code = sct("39579001", "Anaphylaxis (disorder)");
const RHINITIS: Code = sct("878820003", "Rhinoconjunctivitis (disorder)");

pub(crate) static ALLERGIES: &[AllergyDef] = &[
    AllergyDef {
        code: sct("300916003", "Latex allergy"),
        category: "environment",
        reaction: HIVES,
    },
    AllergyDef {
        code: sct("91935009", "Allergy to peanuts"),
        category: "food",
        reaction: ANAPHYLAXIS,
    },
    AllergyDef {
        code: sct("294505008", "Allergy to amoxicillin"),
        category: "medication",
        reaction: RASH,
    },
    AllergyDef {
        code: sct("91936005", "Allergy to penicillin"),
        category: "medication",
        reaction: RASH,
    },
    AllergyDef {
        code: sct("91930004", "Allergy to eggs"),
        category: "food",
        reaction: HIVES,
    },
    AllergyDef {
        code: sct("417532002", "Allergy to fish"),
        category: "food",
        reaction: HIVES,
    },
    AllergyDef {
        code: sct("300913006", "Shellfish allergy"),
        category: "food",
        reaction: ANAPHYLAXIS,
    },
    AllergyDef {
        code: sct("419474003", "Allergy to mould"),
        category: "environment",
        reaction: RHINITIS,
    },
    AllergyDef {
        code: sct("232350006", "House dust mite allergy"),
        category: "environment",
        reaction: RHINITIS,
    },
    AllergyDef {
        code: sct("418689008", "Allergy to grass pollen"),
        category: "environment",
        reaction: RHINITIS,
    },
];

// --- Procedures -----------------------------------------------------------

pub(crate) static PROCEDURES: &[Code] = &[
    sct("430193006", "Medication Reconciliation (procedure)"),
    sct(
        "710824005",
        "Assessment of health and social care needs (procedure)",
    ),
    sct("171207006", "Depression screening (procedure)"),
    sct("428211000124100", "Assessment of substance use (procedure)"),
    sct("762993000", "Assessment using Morse Fall Scale (procedure)"),
    sct("117015009", "Throat culture (procedure)"),
    sct(
        "23426006",
        "Measurement of respiratory function (procedure)",
    ),
    sct(
        "33879002",
        "Administration of vaccine to produce active immunity (procedure)",
    ),
];

// --- Care team ------------------------------------------------------------

pub(crate) const ROLE_PCP: Code = sct("446050000", "Primary care physician (occupation)");
pub(crate) const ROLE_PROFESSIONAL: Code = sct("223366009", "Healthcare professional (occupation)");
pub(crate) const ROLE_SERVICES: Code = sct("224891009", "Healthcare services (qualifier value)");

// --- Devices --------------------------------------------------------------

pub(crate) const GLUCOSE_METER: Code = sct("337414009", "Blood glucose meters (physical object)");
pub(crate) static OTHER_DEVICES: &[Code] = &[
    sct(
        "702172008",
        "Home continuous positive airway pressure unit (physical object)",
    ),
    sct("58938008", "Wheelchair (physical object)"),
];

// --- Observations ---------------------------------------------------------

pub(crate) const HEIGHT: Code = loinc("8302-2", "Body Height");
pub(crate) const WEIGHT: Code = loinc("29463-7", "Body Weight");
pub(crate) const BMI: Code = loinc("39156-5", "Body mass index (BMI) [Ratio]");
pub(crate) const HEART_RATE: Code = loinc("8867-4", "Heart rate");
pub(crate) const RESP_RATE: Code = loinc("9279-1", "Respiratory rate");
pub(crate) const BODY_TEMP: Code = loinc("8310-5", "Body temperature");
pub(crate) const BP_PANEL: Code =
    loinc("85354-9", "Blood pressure panel with all children optional");
pub(crate) const SYSTOLIC: Code = loinc("8480-6", "Systolic Blood Pressure");
pub(crate) const DIASTOLIC: Code = loinc("8462-4", "Diastolic Blood Pressure");
pub(crate) const PAIN: Code = loinc(
    "72514-3",
    "Pain severity - 0-10 verbal numeric rating [Score] - Reported",
);
pub(crate) const OXYGEN_SATURATION: Code = loinc("2708-6", "Oxygen saturation in Arterial blood");
pub(crate) const GLUCOSE: Code = loinc("2339-0", "Glucose [Mass/volume] in Blood");
pub(crate) const HBA1C: Code = loinc("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood");
pub(crate) const CHOLESTEROL: Code =
    loinc("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma");
pub(crate) const HDL: Code = loinc(
    "2085-9",
    "Cholesterol in HDL [Mass/volume] in Serum or Plasma",
);
pub(crate) const TRIGLYCERIDES: Code =
    loinc("2571-8", "Triglycerides [Mass/volume] in Serum or Plasma");
pub(crate) const HEMOGLOBIN: Code = loinc("718-7", "Hemoglobin [Mass/volume] in Blood");
pub(crate) const CREATININE: Code = loinc("2160-0", "Creatinine [Mass/volume] in Serum or Plasma");

// --- Insurance --------------------------------------------------------------

pub(crate) const PLAN_PRIVATE: Code = Code {
    system: ACT_CODE,
    code: "HIP",
    display: "health insurance plan policy",
};
pub(crate) const PLAN_PUBLIC: Code = Code {
    system: ACT_CODE,
    code: "SUBSIDIZ",
    display: "subsidized health program",
};
